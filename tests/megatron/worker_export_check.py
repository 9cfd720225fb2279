"""torchrun worker (2 ranks, gloo): a trained megatron checkpoint vs the HF dir the run exported from it.

Usage: torchrun --nproc_per_node=2 tests/megatron/worker_export_check.py BASE_DIR CKPT_DIR EXPORT_DIR PARAMS_DTYPE OUT

Loads the policy at TP=2 + SP from BASE_DIR (the checkpoint the run started from) with the run's params dtype,
restores CKPT_DIR (torch_dist, the run's last step), and compares with EXPORT_DIR (``best/``):
  * weights: every exported tensor equals the restored policy's, cast to the export's dtype (bit-exact);
  * log-probs of fixed completions: megatron (restored) vs the HF backend reloading EXPORT_DIR, and vs the HF
    backend on BASE_DIR (how far training moved them).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer, GraniteSpeechConfig

    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy, convert, parallel
    from nemo_grpo.policy.tokens import resolve_pad

    base, ckpt, export, dtype, out = sys.argv[1:6]
    params_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    config = GraniteSpeechConfig.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    resolve_pad(tok, config.text_config.vocab_size, reserved=(config.audio_token_index,))
    batch = C.prompt_batch(tok, config)
    ids, mask, group = C.completions(tok)

    pol = MegatronGraniteSpeechPolicy.from_pretrained(base, tensor_parallel_size=2, sequence_parallel=True,
                                                      params_dtype=params_dtype, trainable=False)
    pol.load_checkpoint(ckpt)
    with torch.no_grad():
        lp_meg, _ = pol.score(pol.encode(batch), ids, group)
    state = pol.state_dict()  # TP-gathered, HF names (test only)
    result = {}
    if C.rank() == 0:
        import json

        index = os.path.join(export, "model.safetensors.index.json")
        files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
            else ["model.safetensors"]
        exported = {}
        for fname in files:
            with safe_open(os.path.join(export, fname), "pt") as f:
                for key in f.keys():
                    exported[convert.normalize_key(key)] = f.get_tensor(key)
        tied = "lm_head.weight"
        want = {k: v for k, v in state.items() if k != tied or k in exported}
        result["weights_missing"] = sorted(set(want) - set(exported))[:5]
        result["weights_unexpected"] = sorted(set(exported) - set(want))[:5]
        result["weights_max_diff"] = max(float((exported[k].float() - v.to(exported[k].dtype).float()).abs().max())
                                         for k, v in want.items() if k in exported)
        result["export_dtype"] = str(next(iter(exported.values())).dtype)
        hf = HFGraniteSpeechPolicy.from_pretrained(export)
        with torch.no_grad():
            lp_hf, _ = hf.score(hf.encode(batch), ids, group)
        start = HFGraniteSpeechPolicy.from_pretrained(base)
        with torch.no_grad():
            lp_start, _ = start.score(start.encode(batch), ids, group)
        result["logprob_megatron_vs_hf_export"] = float((lp_meg.float() - lp_hf)[mask].abs().max())
        result["logprob_export_vs_start"] = float((lp_hf - lp_start)[mask].abs().max())
        result["export_pad_is_eos"] = AutoTokenizer.from_pretrained(export).pad_token_id == tok.eos_token_id
    C.write_result(out, result)
    parallel.destroy()


if __name__ == "__main__":
    main()
