"""megatron backend with ``model.backend_options.params_dtype: bf16`` (the 8B recipe's setting): bf16 weights and
activations, fp32 main parameters in the optimizer, fp32 gradient buffers (accumulation + DP reduction).

One ``torchrun --nproc_per_node=2`` launch (worker_bf16.py: parity on the granite-speech-3.3-2b preset, the
optimizer/checkpoint checks on the tiny model); the tests assert on its JSON.
Parity tolerance (bf16 has an 8-bit mantissa: ~4e-3 relative per rounding): log-probs of fixed completions within
5e-2 max / 1e-2 mean of the HF backend in bf16. Measured on the 2b preset (random weights, mean |log-prob| 10.9):
megatron bf16 vs HF bf16 max 1.2e-3 / mean 3.1e-4 (TP=2+SP), 1.5e-3 / 3.0e-4 (TP=1); HF bf16 vs HF fp32 1.6e-3 /
4.4e-4, i.e. the backends differ by less than bf16 differs from fp32.
"""
from __future__ import annotations

import json

import pytest
from _launch import torchrun


@pytest.fixture(scope="module")
def run(tiny_model_dir, preset_2b_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("megatron_bf16")
    out = work / "result.json"
    torchrun("worker_bf16.py", [tiny_model_dir, preset_2b_dir, str(work), str(out)])
    return json.loads(out.read_text())


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["meg_bf16_tp2sp", "meg_bf16_tp1"])
def test_bf16_logprobs_match_hf_bf16(run, layout):
    p = run["parity"]
    r = p[f"{layout}_vs_hf_bf16"]
    assert r["max"] < 5e-2 and r["mean"] < 1e-2, p
    # the same order as bf16's own error against fp32 (either backend), so the mapping is right, not just close
    assert r["max"] < 2 * max(p[f"{layout}_vs_hf_fp32"]["max"], p["hf_bf16_vs_hf_fp32"]["max"]) + 1e-3, p


@pytest.mark.integration
def test_bf16_params_have_fp32_main_params_and_grads(run):
    r = run["optimizer"]
    assert r["model_dtypes"] == ["torch.bfloat16"]
    assert r["main_dtypes"] == ["torch.float32"] and r["grad_buffer_dtypes"] == ["torch.float32"]
    assert r["main_numel_this_rank"] <= r["trainable_numel"] // 2 + 1024  # distributed optimizer: DP-sharded


@pytest.mark.integration
def test_small_step_moves_fp32_main_params_where_bf16_rounds_it_away(run):
    """lr 1e-6: Adam's first step is ~lr per element; far below half a bf16 ulp of weights ~1e-2."""
    r = run["optimizer"]
    assert 0.5e-6 < r["main_max_step"] < 2e-6 and r["main_frac_moved"] > 0.9, r
    assert r["model_frac_moved"] < 0.1, r


@pytest.mark.integration
def test_bf16_checkpoint_restores_fp32_main_params(run):
    r = run["optimizer"]
    assert r["ckpt_main_diff"] == 0.0 and r["ckpt_model_diff"] == 0.0
    assert r["resumed_main_diff"] == 0.0  # Adam state + main params: the resumed step is the uninterrupted one
    # control: rebuilding main params from the bf16 weights loses their sub-bf16 part
    assert r["control_main_diff"] > 1e-7 and r["control_main_vs_bf16"] == 0.0, r
