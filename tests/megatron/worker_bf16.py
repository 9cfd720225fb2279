"""torchrun worker (2 ranks, gloo): the megatron backend with bf16 parameters and fp32 main parameters.

Usage: torchrun --nproc_per_node=2 tests/megatron/worker_bf16.py TINY_DIR PARITY_DIR WORK_DIR OUT_JSON
(PARITY_DIR: a real-shape checkpoint, e.g. the granite-speech-3.3-2b preset: peaked next-token distributions over
a 49160 vocab show bf16 rounding, where the tiny model's near-uniform ones hardly do)

Sections:
  parity      (PARITY_DIR) log-probs of fixed completions, megatron bf16 (TP=2 + SP and TP=1) vs the HF backend in bf16, both
              also against HF fp32 (what bf16 rounding costs either backend).
  optimizer   (TINY_DIR) TP=1 x DP=2, distributed optimizer, bf16 params: the inner torch AdamW steps fp32 main params (sharded
              over DP); gradients are accumulated and DP-reduced in fp32 buffers; a 1e-6 step moves the fp32 main
              params by ~lr while it rounds away in the bf16 params.
  checkpoint  save (torch_dist) after that step, load into a fresh policy: fp32 main params and Adam state come back
              exactly, and the next step equals the uninterrupted run. Control: a fresh policy loading only the bf16
              weights (its main params are the bf16 values) continues differently.
The pytest side (test_megatron_bf16.py) asserts on OUT_JSON.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

import torch  # noqa: E402

SMALL_LR = 1e-6


def main_params(pol) -> list[torch.Tensor]:
    """The optimizer's own (fp32 main) parameters, this rank's DP shard, in a fixed order."""
    opts = getattr(pol.optimizer, "chained_optimizers", [pol.optimizer])
    return [p for o in opts for g in o.optimizer.param_groups for p in g["params"]]


def masked_stats(a, b, mask) -> dict:
    d = (a.float() - b.float())[mask].abs()
    return {"max": float(d.max()), "mean": float(d.mean())}


def parity(model_dir, batch, ids, mask, group) -> dict:
    """Log-prob differences (max / mean over real completion tokens) between backends and dtypes."""
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    lps = {}
    for name, dtype in (("hf_fp32", torch.float32), ("hf_bf16", torch.bfloat16)):
        hf = HFGraniteSpeechPolicy.from_pretrained(model_dir, dtype=dtype)
        with torch.no_grad():
            lps[name] = hf.score(hf.encode(batch), ids, group)[0].float()
        del hf
    for name, tp, sp in (("meg_bf16_tp2sp", 2, True), ("meg_bf16_tp1", 1, False)):
        pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=tp, sequence_parallel=sp,
                                                          params_dtype=torch.bfloat16, trainable=False)
        with torch.no_grad():
            lps[name] = pol.score(pol.encode(batch), ids, group)[0].float()
        del pol
    out = {f"{k}_vs_hf_bf16": masked_stats(lps[k], lps["hf_bf16"], mask) for k in lps if k.startswith("meg")}
    out.update({f"{k}_vs_hf_fp32": masked_stats(lps[k], lps["hf_fp32"], mask) for k in lps if k != "hf_fp32"})
    out["logprob_scale"] = float(lps["hf_fp32"][mask].abs().mean())
    return out


def build(model_dir):
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=1,
                                                      params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    pol.configure_optimizer(lr=SMALL_LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=0.0)
    return pol


def step(pol, batch, ids, mask, group) -> float:
    pol.train()
    lp, _ = pol.score(pol.encode(batch), ids, group)
    w = C.token_weights(mask)
    (-(lp * w).sum() / w.sum()).backward()
    return pol.optimizer_step(SMALL_LR)


def optimizer_and_checkpoint(model_dir, work, batch, ids, mask, group) -> dict:
    import torch.distributed as dist

    res = {}
    pol = build(model_dir)
    mains = main_params(pol)
    res["main_dtypes"] = sorted({str(p.dtype) for p in mains})
    res["model_dtypes"] = sorted({str(p.dtype) for p in pol.module.parameters() if p.requires_grad})
    res["grad_buffer_dtypes"] = sorted({str(b.grad_dtype) for b in pol.ddp.buffers})
    res["main_numel_this_rank"] = sum(p.numel() for p in mains)
    res["trainable_numel"] = sum(p.numel() for p in pol.module.parameters() if p.requires_grad)
    main0 = [p.detach().clone() for p in mains]
    model0 = [p.detach().clone() for p in pol.module.parameters() if p.requires_grad]
    step(pol, batch, ids, mask, group)
    moved = torch.cat([(p - q).abs().flatten() for p, q in zip(mains, main0)])
    res["main_max_step"] = float(moved.max())
    res["main_frac_moved"] = float((moved > 0).float().mean())
    model_moved = torch.cat([(p.float() - q.float()).abs().flatten()
                             for p, q in zip([p for p in pol.module.parameters() if p.requires_grad], model0)])
    res["model_frac_moved"] = float((model_moved > 0).float().mean())

    ck = os.path.join(work, "ckpt_bf16")
    pol.save_checkpoint(ck)
    saved_main = [p.detach().clone() for p in main_params(pol)]
    saved_model = pol.state_dict()
    step(pol, batch, ids, mask, group)
    after_main = [p.detach().clone() for p in main_params(pol)]
    del pol

    fresh = build(model_dir)
    fresh.load_checkpoint(ck)
    res["ckpt_main_diff"] = max(float((p - q).abs().max()) for p, q in zip(main_params(fresh), saved_main))
    res["ckpt_model_diff"] = C.max_diff(fresh.state_dict(), saved_model)
    step(fresh, batch, ids, mask, group)
    res["resumed_main_diff"] = max(float((p - q).abs().max()) for p, q in zip(main_params(fresh), after_main))
    del fresh

    control = build(model_dir)  # the same bf16 weights, but main params re-made from them: the sub-bf16 part is lost
    control.load_state_dict(saved_model)
    res["control_main_diff"] = max(float((p - q).abs().max()) for p, q in zip(main_params(control), saved_main))
    # ... and they are exactly the loaded bf16 weights (the model params are the main params rounded to bf16)
    res["control_main_vs_bf16"] = max(float((p - q.to(torch.bfloat16).float()).abs().max())
                                      for p, q in zip(main_params(control), saved_main))
    dist.barrier()
    return res


def main() -> None:
    from transformers import AutoTokenizer, GraniteSpeechConfig

    from nemo_grpo.policy.megatron import parallel

    model_dir, parity_dir, work, out = sys.argv[1:5]
    tok = AutoTokenizer.from_pretrained(parity_dir)
    batch = C.prompt_batch(tok, GraniteSpeechConfig.from_pretrained(parity_dir))
    result = {"parity": parity(parity_dir, batch, *C.completions(tok))}
    C.write_result(out, result)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = C.prompt_batch(tok, GraniteSpeechConfig.from_pretrained(model_dir))
    ids, mask, group = C.completions(tok)
    result["optimizer"] = optimizer_and_checkpoint(model_dir, work, batch, ids, mask, group)
    C.write_result(out, result)
    parallel.destroy()


if __name__ == "__main__":  # dist_checkpointing's spawn-mode writers re-import __main__
    main()
