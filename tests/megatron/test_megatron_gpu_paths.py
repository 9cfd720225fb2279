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
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def decode_run(tiny_model_dir, tmp_path_factory):
    """worker_decode_mask.py in one plain process (world of 1), ~10 s."""
    out = tmp_path_factory.mktemp("decode_mask") / "decode_mask.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "worker_decode_mask.py"), tiny_model_dir, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.integration
def test_decode_steps_keep_a_mask_type_that_honours_left_padding(decode_run):
    """megatron-core 0.16 switches decode steps to ``no_mask``; TE then attends to the pad keys of shorter
    prompts. Every call (prefill and each decode step) must reach core attention as ``arbitrary`` with its mask."""
    res = decode_run
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


@pytest.mark.integration
def test_fp8_row_padding_leaves_fp32_results_unchanged(decode_run):
    """With FP8's row multiple (16): prefill (prompts x prompt length), decode (samples) and scoring/training
    forwards all hand GEMMs row counts that are multiples of 16, and the padding changes nothing in fp32."""
    pad = decode_run["padded"]
    assert pad["rows"] and all(r % 16 == 0 for r in pad["rows"]), pad["rows"]
    assert min(pad["rows"]) == 16  # the decode steps: 4 samples padded to 16 rows
    assert pad["same_tokens"]
    assert pad["score_diff"] < 1e-5 and pad["generate_logprob_diff"] < 1e-5


class FusedAdamLayout(torch.optim.Optimizer):
    """The per-parameter state layout of TE's (and apex's) ``FusedAdam`` without importing TE: ``exp_avg`` and
    ``exp_avg_sq`` per parameter, the step count in the param group. (``master_param`` joins them only with
    ``master_weights``, megatron's precision-aware path, which restores through ``set_scaled_state`` instead.)"""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.add_(st["exp_avg"] / (st["exp_avg_sq"].sqrt() + group["eps"]), alpha=-group["lr"])


def _params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam, FusedAdamLayout])
def test_adam_state_template_matches_what_the_optimizer_itself_creates(cls):
    from nemo_grpo.policy.megatron.policy import adam_state_keys, init_adam_state

    template = cls(_params())
    init_adam_state(template)
    stepped = cls(_params())
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    stepped.step()
    for opt in (template, stepped):
        assert [sorted(st) for st in opt.state.values()] == [sorted(adam_state_keys(cls))] * 2
    assert ("step" in adam_state_keys(cls)) == (cls is not FusedAdamLayout)


def test_fused_adam_resume_copies_only_checkpointed_tensors():
    """megatron's own restore copy (DistributedOptimizer._set_main_param_and_optimizer_states) over the template
    with what a FusedAdam checkpoint holds per parameter: a template with ``step`` raised KeyError: 'step'."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from nemo_grpo.policy.megatron.policy import init_adam_state

    main = torch.nn.Parameter(torch.zeros(3))
    opt = FusedAdamLayout([main])
    init_adam_state(opt)
    model_param = torch.nn.Parameter(torch.zeros(3))
    holder = SimpleNamespace(model_param_group_index_map={model_param: (0, 0)}, optimizer=opt,
                             config=SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))
    ckpt = {"param": torch.full((3,), 1.0), "exp_avg": torch.full((3,), 2.0), "exp_avg_sq": torch.full((3,), 3.0)}
    with torch.no_grad():  # as megatron's callers (load_parameter_state_from_fs_model_space is no_grad)
        DistributedOptimizer._set_main_param_and_optimizer_states(holder, model_param, ckpt)
    assert main.tolist() == [1.0] * 3 and opt.state[main]["exp_avg_sq"].tolist() == [3.0] * 3


def test_adam_class_megatron_picks_here_gets_the_step_it_needs():
    from megatron.core.optimizer import Adam
    from megatron.core.optimizer import distrib_optimizer as dopt

    from nemo_grpo.policy.megatron.policy import adam_state_keys

    assert ("step" in adam_state_keys(Adam)) == (not dopt.HAVE_APEX_OR_TE)


@pytest.mark.parametrize("cuda,te,kernel,expected", [
    (False, False, False, dict(rope=False, swiglu=False, grad_accum=False)),  # CPU: all off
    (False, False, True, dict(rope=False, swiglu=False, grad_accum=False)),
    (True, False, False, dict(rope=False, swiglu=True, grad_accum=False)),    # GPU, no TE, no apex
    (True, False, True, dict(rope=False, swiglu=True, grad_accum=True)),      # GPU + apex
    (True, True, False, dict(rope=True, swiglu=True, grad_accum=False)),      # GPU + TE
    (True, True, True, dict(rope=True, swiglu=True, grad_accum=True)),        # NGC container
])
def test_fusions_auto_resolves_to_what_the_machine_supports(cuda, te, kernel, expected):
    from nemo_grpo.policy.megatron.model import resolve_fusions

    assert resolve_fusions("auto", cuda=cuda, te=te, grad_accum_kernel=kernel) == expected
    assert resolve_fusions(None, cuda=cuda, te=te, grad_accum_kernel=kernel) == expected
    assert not any(resolve_fusions("off", cuda=cuda, te=te, grad_accum_kernel=kernel).values())


def test_fusions_mapping_overrides_and_validation():
    from nemo_grpo.policy.megatron.model import resolve_fusions

    ngc = dict(cuda=True, te=True, grad_accum_kernel=True)
    assert resolve_fusions({"rope": False, "swiglu": "auto"}, **ngc) == dict(rope=False, swiglu=True, grad_accum=True)
    assert resolve_fusions({"swiglu": True}, cuda=False, te=False, grad_accum_kernel=False)["swiglu"]
    with pytest.raises(ValueError, match=r"fusions: unknown key\(s\) \['layernorm'\]"):
        resolve_fusions({"layernorm": True}, **ngc)
    with pytest.raises(ValueError, match=r"fusions\.rope=true needs Transformer Engine"):
        resolve_fusions({"rope": True}, cuda=True, te=False, grad_accum_kernel=True)
    with pytest.raises(ValueError, match=r"fusions\.grad_accum=true needs CUDA"):
        resolve_fusions({"grad_accum": True}, cuda=False, te=True, grad_accum_kernel=True)
    with pytest.raises(ValueError, match="use 'auto', 'off'"):
        resolve_fusions("on", **ngc)
    with pytest.raises(ValueError, match="use true, false or 'auto'"):
        resolve_fusions({"rope": "yes"}, **ngc)


def test_fusion_flags_reach_megatrons_transformer_config():
    """The resolved flags are the ones megatron's TransformerConfig gets (CPU here: auto = off; an explicit
    swiglu fusion, which runs anywhere, is passed through)."""
    from transformers import GraniteConfig

    from nemo_grpo.policy.megatron import model as mm

    cfg = GraniteConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    auto = mm.transformer_config(cfg, use_te=False)
    assert not (auto.apply_rope_fusion or auto.bias_activation_fusion or auto.gradient_accumulation_fusion)
    on = mm.transformer_config(cfg, use_te=False, fusions={"swiglu": True})
    assert on.bias_activation_fusion and not on.apply_rope_fusion


def test_fusions_is_a_known_backend_option_and_validated_before_loading():
    from types import SimpleNamespace

    from nemo_grpo.policy.megatron import build_policy

    cfg = SimpleNamespace(backend_options={"fusions": {"rope": True}}, path="/nonexistent",
                          tensor_parallel_size=1, sequence_parallel=False)
    with pytest.raises(ValueError, match=r"fusions\.rope=true needs Transformer Engine"):
        build_policy(cfg)


@pytest.mark.parametrize("fp8,recipe", [("hybrid", None), ("e4m3", "delayed"), ("hybrid", "tensorwise"),
                                        ("hybrid", "mxfp8"), ("e4m3", "blockwise"), (None, None)])
def test_fp8_settings_megatron_0_16_knows_pass_with_te(fp8, recipe):
    from nemo_grpo.policy.megatron.model import validate_fp8

    validate_fp8(fp8, recipe, use_te=True)


@pytest.mark.parametrize("fp8,recipe,match", [
    ("e5m2", None, r"fp8='e5m2': choose from \['hybrid', 'e4m3'\]"),
    (True, None, r"fp8=True: choose from"),
    ("hybrid", "custom", r"fp8_recipe='custom': choose from \['delayed', 'tensorwise', 'mxfp8', 'blockwise'\]"),
    (None, "delayed", r"fp8_recipe='delayed' without model.backend_options.fp8"),
])
def test_fp8_settings_are_validated(fp8, recipe, match):
    from nemo_grpo.policy.megatron.model import validate_fp8

    with pytest.raises(ValueError, match=match):
        validate_fp8(fp8, recipe, use_te=True)


@pytest.mark.parametrize("recipe", ["grpo_librisqa_8b_fp8", "grpo_covost2_8b_fp8"])
def test_fp8_recipes_dry_run_and_refuse_to_build_without_te(recipe, capsys):
    from nemo_grpo.cli import main
    from nemo_grpo.policy.megatron import build_policy
    from nemo_grpo.train.config import load_config

    root = os.path.dirname(os.path.dirname(HERE))
    path = os.path.join(root, "conf", recipe + ".yaml")
    assert main(["train", "--config", path, "model.path=/ckpt", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["backend_options"]["fp8"] == "hybrid" and cfg["model"]["backend"] == "megatron"
    model_cfg = load_config(path, ["model.path=/nonexistent"]).model
    with pytest.raises(ValueError, match=r"'model\.backend_options\.fp8'='hybrid' needs Transformer Engine"):
        build_policy(model_cfg)  # this machine has no TE: the error comes before any weights are read
