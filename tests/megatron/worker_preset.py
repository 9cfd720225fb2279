"""torchrun worker (2 ranks, gloo, fp32): the megatron backend vs the HF backend on the REAL-SHAPE presets.

Usage: torchrun --nproc_per_node=2 tests/megatron/worker_preset.py PRESET_2B_DIR PRESET_8B_DIR WORK_DIR OUT_JSON

The presets (``nemo_grpo.policy.presets``) carry what the tiny model hides: a 49160-row vocabulary that the
tokenizer fills (pad == eos, ``<|audio|>`` the last row), GQA 32/8 heads with head_dim 64 (2B) / 128 (8B), the
released multipliers, projector dropouts 0.1, a rank-64 audio LoRA (merged at load by megatron), bf16 weights on
disk (loaded as fp32 here).

Sections:
  p2b     TP=1 (x DP=2) and TP=2 + SP, policy in TRAINING mode (as in the GRPO step): log-probs, entropy and
          gradients vs HFGraniteSpeechPolicy; greedy tokens vs HF; sampling-time log-probs vs its own scoring of
          the same tokens (left-padded prompts of different lengths); negative control: the
          released projector dropouts switched back on move the log-probs far beyond the tolerance.
  p8b     TP=2: load, score vs HF, export a HF dir (streamed, bf16 as the checkpoint): every exported tensor is the
          policy's, rounded to bf16; the HF backend reloading it scores within bf16 rounding of the policy.
"""
from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

import torch  # noqa: E402


def masked_max(a, b, mask) -> float:
    return float((a - b)[mask].abs().max())


def hf_reference(model_dir, batch, ids, mask, group, grads: bool = True) -> dict:
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    hf = HFGraniteSpeechPolicy.from_pretrained(model_dir)
    hf.train()
    lp, ent = hf.score(hf.encode(batch), ids, group, temperature=0.7, return_entropy=True)
    out = {"lp": lp.detach(), "ent": ent.detach(), "pad": hf.pad_token_id}
    if grads:
        (lp * C.token_weights(mask)).sum().backward()
        # the audio LoRA is frozen and megatron merges it: d/dW of the merged W + s B A is d/dW of the base weight
        out["grads"] = {n.replace(".base_layer.", "."): p.grad.clone() for n, p in hf.model.named_parameters()
                        if p.grad is not None and "lora_" not in n}
        hf.eval()
        out["greedy"] = hf.generate(hf.encode(batch), 1, 6, temperature=0.0)
    del hf
    gc.collect()
    return out


def released_dropout(module: torch.nn.Module, p: float = 0.1) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


def preset_2b(model_dir, batch, ids, mask, group) -> dict:
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    ref = hf_reference(model_dir, batch, ids, mask, group)
    res = {"grad_scale": max(float(g.abs().max()) for g in ref["grads"].values())}
    for name, tp, sp in (("tp1", 1, False), ("tp2sp", 2, True)):
        pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=tp, sequence_parallel=sp)
        pol.train()
        lp, ent = pol.score(pol.encode(batch), ids, group, temperature=0.7, return_entropy=True)
        (lp * C.token_weights(mask)).sum().backward()
        pol.finalize_grads(all_reduce=True)
        grads = pol.full_grads_hf()
        pol.zero_grads()
        pol.eval()
        # sampled: the recorded log pi_old equals this backend's own scoring of the same tokens (KV-cache decode
        # over left-padded prompts vs one full forward). Sampled tokens are not compared across backends: at a
        # near-uniform 49160-way distribution, top-p's sort order flips on 1e-7 differences.
        ctx = pol.encode(batch)
        gen = pol.generate(ctx, 2, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            lp_gen, _ = pol.score(ctx, gen.token_ids, gen.group)
        greedy = pol.generate(ctx, 1, 6, temperature=0.0)
        r = {"logprob": masked_max(lp.detach(), ref["lp"], mask),
             "entropy": masked_max(ent.detach(), ref["ent"], mask),
             "grad": C.max_diff(grads, ref["grads"]), "lora_merged": pol.lora_merged,
             "pad": pol.pad_token_id, "hf_pad": ref["pad"], "eos": pol.eos_token_id,
             "gen_vs_score": masked_max(gen.logprobs, lp_gen, gen.mask), "gen_tokens": int(gen.mask.sum()),
             "greedy_equal": bool(torch.equal(greedy.token_ids, ref["greedy"].token_ids)),
             "greedy_logprob": masked_max(greedy.logprobs, ref["greedy"].logprobs, greedy.mask)}
        if name == "tp2sp":
            pol.train()
            released_dropout(pol.module.projector)
            with torch.no_grad():
                lp_drop, _ = pol.score(pol.encode(batch), ids, group, temperature=0.7)
            r["dropout_on_logprob"] = masked_max(lp_drop, ref["lp"], mask)
        res[name] = r
        del pol
        gc.collect()
    return res


def preset_8b(model_dir, work, batch, ids, mask, group) -> dict:
    from transformers import AutoTokenizer

    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    ref = hf_reference(model_dir, batch, ids, mask, group, grads=False)
    pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=2, trainable=False)
    with torch.no_grad():
        lp, _ = pol.score(pol.encode(batch), ids, group, temperature=0.7)
    res = {"logprob": masked_max(lp, ref["lp"], mask), "lora_merged": pol.lora_merged}
    out = os.path.join(work, "export_8b")
    pol.save_pretrained(out)  # streamed, in the checkpoint's dtype (bf16)
    state = pol.state_dict()  # TP-gathered fp32 weights, HF names (test only)
    del pol
    gc.collect()
    if C.rank() == 0:
        from nemo_grpo.policy.megatron import hf_io

        exported = hf_io.CheckpointReader(out, lora={})
        with exported:
            res["export_dtype"] = str(exported.read(next(iter(state))).dtype)
            res["export_weights_vs_policy"] = max(
                float((exported.read(k).float() - v.to(torch.bfloat16).float()).abs().max()) for k, v in state.items())
    del state
    hf = HFGraniteSpeechPolicy.from_pretrained(out)
    with torch.no_grad():
        lp_hf, _ = hf.score(hf.encode(batch), ids, group, temperature=0.7)
    res["export_logprob"] = masked_max(lp_hf, ref["lp"], mask)
    exported = AutoTokenizer.from_pretrained(out)  # the checkpoint's own tokenizer files, pad == eos
    res["export_pad_is_eos"] = exported.pad_token_id == exported.eos_token_id
    res["export_vocab"] = len(exported)
    return res


def main() -> None:
    from transformers import AutoTokenizer, GraniteSpeechConfig

    from nemo_grpo.policy.tokens import resolve_pad

    dir_2b, dir_8b, work, out = sys.argv[1:5]
    result = {}
    for key, model_dir in (("p2b", dir_2b), ("p8b", dir_8b)):
        config = GraniteSpeechConfig.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        resolve_pad(tok, config.text_config.vocab_size, reserved=(config.audio_token_index,))
        batch = C.prompt_batch(tok, config)
        ids, mask, group = C.completions(tok)
        if key == "p2b":
            result[key] = preset_2b(model_dir, batch, ids, mask, group)
        else:
            result[key] = preset_8b(model_dir, work, batch, ids, mask, group)
        C.write_result(out, result)
    from nemo_grpo.policy.megatron import parallel

    parallel.destroy()


if __name__ == "__main__":  # dist_checkpointing's spawn-mode writers re-import __main__
    main()
