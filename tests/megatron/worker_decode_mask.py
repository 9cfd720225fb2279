"""One process (world of 1, gloo, fp32): the attention mask type megatron hands core attention while sampling.

Usage: python tests/megatron/worker_decode_mask.py TINY_DIR OUT_JSON

A spy on every layer's ``core_attention.forward`` records the query length, ``attn_mask_type`` and mask shape of
each call during ``generate`` on left-padded prompts of different lengths. The type reaching core attention is
decided in megatron's ``Attention._adjust_key_value_for_inference`` before the core-attention module is chosen,
so the local spec sees the type the TE spec's ``TEDotProductAttention`` would get (which ignores the mask for
``no_mask``). test_megatron_gpu_paths.py asserts on OUT_JSON.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

import torch  # noqa: E402


def main(model_dir: str, out: str) -> None:
    from nemo_grpo.policy.megatron import parallel
    from nemo_grpo.policy.megatron.policy import MegatronGraniteSpeechPolicy

    pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, trainable=False)
    batch = C.prompt_batch(pol.tokenizer, pol.config)
    calls = []
    for layer in pol.gpt.decoder.layers:
        core = layer.self_attention.core_attention
        orig = core.forward

        def spy(query, key, value, attention_mask, *args, orig=orig, **kwargs):
            mask_type = kwargs.get("attn_mask_type", args[0] if args else None)
            calls.append({"sq": int(query.shape[0]), "sk": int(key.shape[0]),
                          "mask_type": getattr(mask_type, "name", str(mask_type)),
                          "mask_shape": None if attention_mask is None else list(attention_mask.shape),
                          "masked_keys": 0 if attention_mask is None else int(attention_mask.sum())})
            return orig(query, key, value, attention_mask, *args, **kwargs)

        core.forward = spy
    ctx = pol.encode(batch)
    comp = pol.generate(ctx, 2, 4, generator=torch.Generator().manual_seed(0))
    lp, _ = pol.score(ctx, comp.token_ids, comp.group)
    result = {
        "attention_class": type(pol.gpt.decoder.layers[0].self_attention).__name__,
        "prompt_lengths": batch.attention_mask.sum(1).tolist(),
        "calls": calls,
        "generate_vs_score": float((lp - comp.logprobs)[comp.mask].abs().max()),
    }
    # FP8 row padding (what pol.row_multiple is with FP8 on; TE itself cannot run here): same results in fp32,
    # and every GEMM (the first layer's linear_qkv stands for all) sees a row count that is a multiple of 16
    rows = []
    pol.gpt.decoder.layers[0].self_attention.linear_qkv.register_forward_pre_hook(
        lambda mod, args: rows.append(int(args[0].shape[0] * args[0].shape[1])))
    pol.row_multiple = 16
    comp16 = pol.generate(ctx, 2, 4, generator=torch.Generator().manual_seed(0))
    lp16, _ = pol.score(ctx, comp.token_ids, comp.group)
    result["padded"] = {
        "rows": rows,
        "score_diff": float((lp16 - lp)[comp.mask].abs().max()),
        "same_tokens": bool(torch.equal(comp16.token_ids, comp.token_ids) and torch.equal(comp16.mask, comp.mask)),
        "generate_logprob_diff": float((comp16.logprobs - comp.logprobs)[comp.mask].abs().max()),
    }
    C.write_result(out, result)
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:3])
