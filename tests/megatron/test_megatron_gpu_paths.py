"""GPU-only code paths of the megatron backend checked on CPU: what megatron passes to Transformer Engine.

TE cannot run here (see the module docstrings); these tests pin the decisions megatron-core makes before it hands
work to TE: the attention mask type on decode steps, the optimizer state layout, the fusion flags.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.integration
def test_decode_steps_keep_a_mask_type_that_honours_left_padding(tiny_model_dir, tmp_path):
    """megatron-core 0.16 switches decode steps to ``no_mask``; TE then attends to the pad keys of shorter
    prompts. Every call (prefill and each decode step) must reach core attention as ``arbitrary`` with its mask."""
    out = tmp_path / "decode_mask.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "worker_decode_mask.py"), tiny_model_dir, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert len(set(res["prompt_lengths"])) > 1  # left padding present
    decode = [c for c in res["calls"] if c["sq"] == 1 and c["sk"] > 1]
    prefill = [c for c in res["calls"] if c["sq"] > 1]
    assert decode and prefill
    for c in res["calls"]:
        assert c["mask_type"] == "arbitrary", c
    for c in decode:  # [N, 1, 1, Sk] with the shorter prompt's pad keys masked
        assert c["mask_shape"][1:] == [1, 1, c["sk"]] and c["masked_keys"] > 0, c
    assert res["generate_vs_score"] < 1e-5
    assert res["attention_class"] == "GraniteSelfAttention"
