"""torchrun worker (2 ranks, gloo, fp32): megatron backend vs the HF backend, checkpoints and HF export.

Usage: torchrun --nproc_per_node=2 tests/megatron/worker_megatron.py TINY_DIR TINY_LORA_DIR WORK_DIR OUT_JSON

Sections (all in one launch: torchrun start + imports cost ~15 s each):
  equivalence  TP=1 (x DP=2), TP=2, TP=2+SP: log-probs, entropy, gradients, sampled tokens vs HFGraniteSpeechPolicy;
               negative control for each Granite multiplier; audio-LoRA checkpoint merged at load.
  checkpoint   train step at TP=2+SP, save (torch_dist), resume at TP=1: identical params, continued step equal to
               the uninterrupted run; and back TP=1 -> TP=2. Control: same weights, fresh optimizer state.
  export       streaming save_pretrained at TP=2 (small shards + index) -> transformers from_pretrained: equal
               weights and log-probs.
  lazy loading each rank's loaded shards equal the sharded TP=1 conversion; at TP=2 a rank reads ~half the LLM.
The pytest side (test_megatron_backend.py) asserts on OUT_JSON.
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

import torch  # noqa: E402

LR = 1e-3


def hf_reference(model_dir, batch, ids, mask, group):
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    hf = HFGraniteSpeechPolicy.from_pretrained(model_dir)
    hf.train()
    lp, ent = hf.score(hf.encode(batch), ids, group, temperature=0.7, return_entropy=True)
    (lp * C.token_weights(mask)).sum().backward()
    grads = {n: p.grad.clone() for n, p in hf.model.named_parameters() if p.grad is not None}
    hf.eval()
    gen = hf.generate(hf.encode(batch), 3, 10, temperature=1.0, top_p=0.9,
                      generator=torch.Generator().manual_seed(5))
    return hf, {"lp": lp.detach(), "ent": ent.detach(), "grads": grads, "gen": gen}


def masked_max(a, b, mask) -> float:
    return float((a - b)[mask].abs().max())


def controls(pol, batch, ids, mask, group, ref) -> dict:
    """Drop one Granite mapping at a time: log-probs or gradients must move far beyond the parity tolerance.

    (The tiny model's attention is near-uniform, so 1/sqrt(d) instead of attention_multiplier moves the log-probs
    little, but the q/k gradients scale with it.)"""
    layers = pol.gpt.decoder.layers
    text = pol.config.text_config

    def measure():
        pol.zero_grads()
        lp, _ = pol.score(pol.encode(batch), ids, group, temperature=0.7)
        (lp * C.token_weights(mask)).sum().backward()
        pol.finalize_grads(all_reduce=True)
        out = {"logprob": masked_max(lp.detach(), ref["lp"], mask), "grad": C.max_diff(pol.full_grads_hf(),
                                                                                        ref["grads"])}
        pol.zero_grads()
        return out

    def set_attention(scale):
        for layer in layers:
            layer.self_attention.core_attention.softmax_scale = scale

    def set_residual(m):
        for layer in layers:
            layer.self_attn_bda.multiplier = layer.mlp_bda.multiplier = m

    out = {}
    set_attention(1 / math.sqrt(pol.gpt.config.kv_channels))
    out["attention_multiplier"] = measure()
    set_attention(text.attention_multiplier)
    pol.embedding_multiplier = 1.0
    out["embedding_multiplier"] = measure()
    pol.embedding_multiplier = text.embedding_multiplier
    set_residual(1.0)
    out["residual_multiplier"] = measure()
    set_residual(text.residual_multiplier)
    pol.logits_scaling = 1.0
    out["logits_scaling"] = measure()
    pol.logits_scaling = text.logits_scaling
    out["restored"] = measure()
    return out


def lazy_load_check(pol, model_dir) -> dict:
    """This rank's loaded shards vs the TP=1 whole-checkpoint conversion sharded, and the LLM bytes it read."""
    from nemo_grpo.policy.megatron import convert
    from nemo_grpo.policy.megatron import model as mm
    from nemo_grpo.policy.megatron import parallel

    rank, size = parallel.tp_rank_size()
    text = pol.config.text_config
    whole = convert.read_hf_state(model_dir, prefixes=(convert.HF_LLM,))
    full = convert.hf_to_megatron_full(whole, text, mm.padded_vocab_size(text.vocab_size, size))
    diff = max(float((t - convert.shard(k, full[k], rank, size)).abs().max())
               for k, t in pol.gpt.state_dict().items() if "_extra_state" not in k)
    return {"lazy_vs_full_shards": diff, "llm_bytes_read": pol.llm_bytes_read,
            "llm_bytes_on_disk": sum(t.nbytes for t in whole.values())}


def equivalence(model_dir, lora_dir, batch, ids, mask, group) -> dict:
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    _, ref = hf_reference(model_dir, batch, ids, mask, group)
    res = {"grad_scale": max(float(g.abs().max()) for g in ref["grads"].values())}
    for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2sp", 2, True)):
        pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=tp, sequence_parallel=sp)
        lazy = lazy_load_check(pol, model_dir)
        pol.train()
        lp, ent = pol.score(pol.encode(batch), ids, group, temperature=0.7, return_entropy=True)
        (lp * C.token_weights(mask)).sum().backward()
        pol.finalize_grads(all_reduce=True)
        grads = pol.full_grads_hf()
        pol.eval()
        gen = pol.generate(pol.encode(batch), 3, 10, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(5))
        r = {"logprob": masked_max(lp.detach(), ref["lp"], mask),
             "entropy": masked_max(ent.detach(), ref["ent"], mask),
             "grad": C.max_diff(grads, ref["grads"]),
             "gen_tokens_equal": bool(torch.equal(gen.token_ids, ref["gen"].token_ids)),
             "gen_mask_equal": bool(torch.equal(gen.mask, ref["gen"].mask)),
             "gen_logprob": masked_max(gen.logprobs, ref["gen"].logprobs, gen.mask),
             "gen_tokens": int(gen.mask.sum()), **lazy}
        if name == "tp2sp":
            pol.train()
            r["controls"] = controls(pol, batch, ids, mask, group, ref)
        res[name] = r
        del pol
    # a checkpoint with an audio LoRA adapter: HF enables it with audio; megatron merges it at load (TP=2 + SP)
    _, lref = hf_reference(lora_dir, batch, ids, mask, group)
    pol = MegatronGraniteSpeechPolicy.from_pretrained(lora_dir, tensor_parallel_size=2, sequence_parallel=True)
    with torch.no_grad():
        lp, _ = pol.score(pol.encode(batch), ids, group, temperature=0.7)
    res["lora"] = {"logprob": masked_max(lp, lref["lp"], mask), "merged": pol.lora_merged,
                   "vs_base_model": masked_max(lp, ref["lp"], mask)}
    return res


def train_step(pol, batch, ids, mask, group) -> float:
    """One optimizer step on a fixed weighted log-likelihood; returns the loss before the step."""
    pol.train()
    lp, _ = pol.score(pol.encode(batch), ids, group)
    w = C.token_weights(mask)
    loss = -(lp * w).sum() / w.sum()
    loss.backward()
    pol.optimizer_step(LR)
    return float(loss.detach())


def eval_loss(pol, batch, ids, mask, group) -> float:
    """The same weighted loss without a step (to compare runs after a resumed step)."""
    with torch.no_grad():
        lp, _ = pol.score(pol.encode(batch), ids, group)
    w = C.token_weights(mask)
    return float(-(lp * w).sum() / w.sum())


def build(model_dir, tp, sp):
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=tp, sequence_parallel=sp)
    pol.configure_optimizer(lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
    return pol


def checkpoint(model_dir, work, batch, ids, mask, group) -> dict:
    import torch.distributed as dist

    res = {}
    args = (batch, ids, mask, group)
    ck2, ck1 = os.path.join(work, "ckpt_tp2"), os.path.join(work, "ckpt_tp1")
    p2 = build(model_dir, 2, True)
    res["loss_step0"] = train_step(p2, *args)
    p2.save_checkpoint(ck2)
    saved2 = p2.state_dict()
    loss1_ref = train_step(p2, *args)
    after2 = p2.state_dict()
    next2 = eval_loss(p2, *args)
    del p2

    p1 = build(model_dir, 1, False)
    p1.load_checkpoint(ck2)
    res["tp2_to_tp1_params"] = C.max_diff(p1.state_dict(), saved2)
    loss1 = train_step(p1, *args)
    res["tp2_to_tp1_loss"] = abs(loss1 - loss1_ref)
    res["tp2_to_tp1_params_after_step"] = C.max_diff(p1.state_dict(), after2)
    res["tp2_to_tp1_next_loss"] = abs(eval_loss(p1, *args) - next2)
    res["step_size"] = C.max_diff(after2, saved2)
    p1.save_checkpoint(ck1)
    saved1 = p1.state_dict()
    loss2_ref = train_step(p1, *args)
    after1 = p1.state_dict()
    next1 = eval_loss(p1, *args)
    del p1

    # control: the same weights with a fresh optimizer state continue differently
    pc = build(model_dir, 1, False)
    pc.load_state_dict(saved2)
    res["fresh_optimizer_loss"] = abs(train_step(pc, *args) - loss1_ref)
    res["fresh_optimizer_params_after_step"] = C.max_diff(pc.state_dict(), after2)
    res["fresh_optimizer_next_loss"] = abs(eval_loss(pc, *args) - next2)
    del pc

    p2 = build(model_dir, 2, True)
    p2.load_checkpoint(ck1)
    res["tp1_to_tp2_params"] = C.max_diff(p2.state_dict(), saved1)
    res["tp1_to_tp2_loss"] = abs(train_step(p2, *args) - loss2_ref)
    res["tp1_to_tp2_params_after_step"] = C.max_diff(p2.state_dict(), after1)
    res["tp1_to_tp2_next_loss"] = abs(eval_loss(p2, *args) - next1)
    dist.barrier()
    return res, p2


def export(pol, work, batch, ids, mask, group) -> dict:
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    from transformers import GraniteSpeechForConditionalGeneration

    out = os.path.join(work, "export_tp2")
    pol.save_pretrained(out, max_shard_bytes=200_000)  # tiny model: ~10 shards + index
    reloaded = GraniteSpeechForConditionalGeneration.from_pretrained(out).state_dict()
    reloaded.pop("lm_head.weight")  # tied: the embedding
    weights = C.max_diff(pol.state_dict(), reloaded)
    shards = sum(f.endswith(".safetensors") for f in os.listdir(out))
    with torch.no_grad():
        lp, _ = pol.score(pol.encode(batch), ids, group)
    hf = HFGraniteSpeechPolicy.from_pretrained(out)
    with torch.no_grad():
        lp_hf, _ = hf.score(hf.encode(batch), ids, group)
    base = HFGraniteSpeechPolicy.from_pretrained(sys.argv[1])
    with torch.no_grad():
        lp_base, _ = base.score(base.encode(batch), ids, group)
    return {"logprob": masked_max(lp, lp_hf, mask), "trained_vs_base": masked_max(lp_hf, lp_base, mask),
            "weights": weights, "shards": shards}


def main() -> None:
    from transformers import AutoTokenizer, GraniteSpeechConfig

    model_dir, lora_dir, work, out = sys.argv[1:5]
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = C.prompt_batch(tok, GraniteSpeechConfig.from_pretrained(model_dir))
    ids, mask, group = C.completions(tok)
    result = {"equivalence": equivalence(model_dir, lora_dir, batch, ids, mask, group)}
    C.write_result(out, result)
    result["checkpoint"], pol = checkpoint(model_dir, work, batch, ids, mask, group)
    C.write_result(out, result)
    result["export"] = export(pol, work, batch, ids, mask, group)
    C.write_result(out, result)
    from nemo_grpo.policy.megatron import parallel

    parallel.destroy()


if __name__ == "__main__":  # dist_checkpointing's spawn-mode writers re-import __main__
    main()
