"""What can be checked of the scale-out files without Slurm, GPUs or a Docker engine: the launch scripts parse, the
command they would run passes torchrun's own argument handling and composes a valid recipe with the intended
TP x DP layout, every 8B recipe composes with every ``conf/scale_out`` option, the Dockerfile keeps the container's
CUDA stack, and every path the guide names exists."""
from __future__ import annotations

import glob
import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from nemo_grpo.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "scripts", "slurm", "grpo_multinode.sbatch")
SINGLE = os.path.join(ROOT, "scripts", "launch", "grpo_single_node.sh")
RECIPES_8B = sorted(glob.glob(os.path.join(ROOT, "conf", "*_8b.yaml")))
SCALE_OUT = sorted(glob.glob(os.path.join(ROOT, "conf", "scale_out", "nodes_*.yaml")))
PAPER_PROMPTS_PER_STEP, PAPER_AUDIO_S = 12, 300.0  # conf/data/{librisqa,covost2}.yaml train batch (one DP rank)


def _name(path: str) -> str:
    return os.path.basename(path)[:-5]


def dry_run(script: str, args: list[str], env: dict[str, str], tmp_path) -> list[str]:
    """Run a launch script with DRY_RUN=1 (``scontrol`` replaced by a stub listing two hosts) -> its argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    stub = bindir / "scontrol"
    stub.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\necho gpu-node-07\necho gpu-node-08\n")
    stub.chmod(0o755)
    full_env = dict(os.environ, DRY_RUN="1", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", **env)
    res = subprocess.run(["bash", script, *args], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout)


def torchrun_config(argv: list[str]):
    """torchrun's own parser + LaunchConfig on the part of ``argv`` after ``torchrun``."""
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(argv[argv.index("torchrun") + 1:])
    config, _, cmd_args = config_from_args(args)
    return args, config, cmd_args


def compose_via_cli(cmd_args: list[str], monkeypatch) -> dict:
    """The CLI's own ``train --dry-run`` on the training arguments: the composed, validated config."""
    from nemo_grpo.cli import main

    assert cmd_args[:3] == ["-u", "-m", "nemo_grpo.cli"], cmd_args
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*cmd_args[3:], "--dry-run"]) == 0
    return json.loads(out.getvalue())


def test_launch_scripts_are_valid_bash():
    for script in (SBATCH, SINGLE):
        subprocess.run(["bash", "-n", script], check=True)
        assert os.access(script, os.X_OK), script


@pytest.mark.parametrize("image", ["", "/shared/images/nemo_grpo.sqsh"])
def test_sbatch_runs_one_torchrun_per_node_tp_in_node_dp_across(image, tmp_path, monkeypatch):
    out_dir = "/runs/grpo 8b"  # a space survives the quoting
    argv = dry_run(SBATCH, ["conf/grpo_librisqa_8b.yaml", "+scale_out=nodes_2", "model.path=/ckpt/g8b",
                            f"output_dir={out_dir}"],
                   {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_ID": "4242",
                    "IMAGE": image}, tmp_path)
    assert argv[0] == "srun" and "--ntasks-per-node=1" in argv and "--nodes=2" in argv
    assert ("--container-image=" + image in argv) == bool(image)
    args, config, cmd_args = torchrun_config(argv)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "gpu-node-07:29500", "4242")
    assert config.max_restarts == 0
    cfg = compose_via_cli(cmd_args, monkeypatch)
    world = config.max_nodes * config.nproc_per_node
    tp = cfg["model"]["tensor_parallel_size"]
    assert cfg["model"]["backend"] == "megatron" and tp == config.nproc_per_node == 4  # one TP group per node
    assert world // tp == 2  # DP across the nodes
    assert cfg["data"]["train"]["batch_size"] * (world // tp) == PAPER_PROMPTS_PER_STEP
    assert cfg["output_dir"] == out_dir and cfg["model"]["path"] == "/ckpt/g8b"


def test_sbatch_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", SBATCH, "conf/grpo_librisqa_8b.yaml"], env=dict(env, DRY_RUN="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "SLURM_NNODES" in res.stderr


def test_single_node_script_is_torchrun_standalone(tmp_path, monkeypatch):
    argv = dry_run(SINGLE, ["conf/grpo_librisqa_8b.yaml", "model.path=/ckpt/g8b"], {"GPUS": "4"}, tmp_path)
    args, config, cmd_args = torchrun_config(argv)
    assert args.standalone and (config.max_nodes, config.nproc_per_node) == (1, 4)
    cfg = compose_via_cli(cmd_args, monkeypatch)
    assert cfg["model"]["tensor_parallel_size"] == 4  # the paper's setup: TP=4, DP=1
    assert cfg["data"]["train"]["batch_size"] == PAPER_PROMPTS_PER_STEP


@pytest.mark.parametrize("option", SCALE_OUT, ids=_name)
@pytest.mark.parametrize("recipe", RECIPES_8B, ids=_name)
def test_every_8b_recipe_composes_with_every_scale_out_option(recipe, option):
    nodes = int(_name(option).split("_")[1])
    base = load_config(recipe)
    cfg = load_config(recipe, [f"+scale_out={_name(option)}"])
    assert cfg.model.tensor_parallel_size == 4 and cfg.model.backend == "megatron"
    assert base.data["train"]["batch_size"] == PAPER_PROMPTS_PER_STEP
    assert cfg.data["train"]["batch_size"] * nodes == PAPER_PROMPTS_PER_STEP
    assert cfg.data["train"]["batch_duration"] * nodes == pytest.approx(PAPER_AUDIO_S)
    # nothing but the per-rank batch changes
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "data"}  # noqa: E731
    assert strip(cfg) == strip(base)


def test_dockerfile_keeps_the_containers_cuda_stack():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    logical = text.replace("\\\n", " ")
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/nemo:\d\d\.\d\d", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    installs = re.findall(r"pip install ([^&]*)", logical)
    assert installs, "no pip install"
    frozen = re.search(r"grep -iE '\^\(([^)]*)\)'", logical).group(1).split("|")
    for pkg in ("torch", "transformer[-_]engine", "apex", "megatron[-_]core", "nemo[-_]toolkit"):
        assert pkg in frozen, pkg  # pinned to the container's own version
    for line in installs:
        tokens = line.split()
        assert "-c" in tokens or "--no-deps" in tokens, line
        for tok in tokens:
            assert not re.match(r"(torch|transformer[-_]engine|apex|megatron[-_]core|nemo[-_]toolkit)\b", tok), tok
    assert "--no-deps -e ." in logical and "nemo-grpo --help" in logical
    ignore = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert ".venv" in ignore and "data" in ignore


def test_guide_names_only_existing_files_and_options():
    doc = open(os.path.join(ROOT, "docs", "scale_out.md")).read()
    paths = set(re.findall(r"(?<![\w/])((?:conf|scripts)/[\w./-]+\.(?:yaml|sh|sbatch))", doc))
    assert {"scripts/slurm/grpo_multinode.sbatch", "scripts/launch/grpo_single_node.sh",
            "conf/grpo_librisqa_8b.yaml"} <= paths
    for p in paths:
        assert os.path.isfile(os.path.join(ROOT, p)), p
    for option in set(re.findall(r"\+scale_out=(nodes_\d+)", doc)):
        assert os.path.isfile(os.path.join(ROOT, "conf", "scale_out", option + ".yaml")), option


CHECK_STACK = os.path.join(ROOT, "scripts", "docker", "check_stack.py")


@pytest.mark.parametrize("version,ok", [
    ("0.16.0rc0", True), ("0.16.0", True), ("0.16.1", True), ("0.16.0.dev0+abc123", True), ("0.17.0", True),
    ("0.15.0", False), ("0.15.0rc1", False), ("0.15.2.dev0", False),
])
def test_dockerfile_megatron_core_check_accepts_016_release_candidates(version, ok):
    """The build's own version check, run as the Dockerfile runs it (a python subprocess): NGC images carry
    rc/dev strings, and PEP 440 orders 0.16.0rc0 before 0.16 (a plain Version comparison refused it)."""
    res = subprocess.run([sys.executable, CHECK_STACK, "--megatron-core", version], capture_output=True, text=True,
                         timeout=60)
    assert (res.returncode == 0) == ok, res.stdout + res.stderr


def test_dockerfile_base_ships_megatron_core_016_and_pins_hub_for_transformers():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    logical = text.replace("\\\n", " ")
    base = re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/nemo:(\d\d)\.(\d\d)", text, re.M)
    assert (int(base.group(1)), int(base.group(2))) >= (26, 2)  # 25.11 ships megatron-core 0.15
    assert "python scripts/docker/check_stack.py" in logical
    assert "Version(mc) >= Version(" not in logical  # the rc-refusing comparison is gone
    install = next(line for line in re.findall(r"pip install ([^&]*)", logical) if "transformers==" in line)
    assert "transformers==5.23.0" in install and "'huggingface-hub>=1.31,<3'" in install
    assert "'tokenizers>=0.23.1,<0.24'" in install
    frozen = re.search(r"grep -iE '\^\(([^)]*)\)'", logical).group(1).split("|")
    assert not any(p.startswith(("huggingface", "tokenizers", "safetensors")) for p in frozen)
