"""Bounded-memory checkpoint I/O of the megatron backend (nemo_grpo/policy/megatron/hf_io.py + convert.py).

* lazy loading: a TP rank's megatron shards built from safetensors SLICES equal the shards of the whole-checkpoint
  conversion (audio LoRA merged per slice), in both on-disk key layouts, single-file and sharded; each rank reads
  exactly its 1/TP of every split tensor (bytes counted by the reader);
* streaming export: the sharded writer's files/index load with safetensors; exporting the 8B-shaped preset adds at
  most ~one largest tensor of peak RSS (measured in a subprocess) and the export reloads in transformers with the
  checkpoint's weights (bf16, LoRA merged).
The 2-rank (torchrun) counterparts live in worker_megatron.py / test_megatron_backend.py.
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
def tiny_lora_dir(tmp_path_factory):
    from nemo_grpo.policy.tiny import make_tiny

    # 4 kv groups (GQA 8/4) so TP=4 is a valid split
    return make_tiny(str(tmp_path_factory.mktemp("tiny_lora_io")), seed=0, has_lora_adapter=True, text_heads=8,
                     text_kv_heads=4)


def _rewrite_sharded_new_layout(src: str, dst: str) -> None:
    """Copy of ``src`` with transformers-5 key names in 3+ shards + index (the other layout a checkpoint can have)."""
    import shutil

    from nemo_grpo.policy.megatron import convert, hf_io

    state = convert.read_hf_state(src)
    plan = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    writer = hf_io.ShardedSafetensorsWriter(dst, plan, max_shard_bytes=sum(v.nbytes for v in state.values()) // 3)
    for k, v in state.items():
        writer.write(k, v)
    assert len(writer.close()) >= 3
    for fname in os.listdir(src):
        if not fname.startswith("model"):
            shutil.copy(os.path.join(src, fname), dst)


@pytest.mark.parametrize("layout", ["legacy_single", "new_sharded"])
def test_lazy_tp_shards_equal_sharded_full_conversion(tiny_lora_dir, tmp_path, layout):
    """megatron_shard_from_hf(slices) == shard(hf_to_megatron_full(whole merged checkpoint)) for TP 1, 2, 4, and
    each rank reads only its own 1/TP of every split tensor (replicated norms: whole, on every rank)."""
    from transformers import GraniteSpeechConfig

    from nemo_grpo.policy.megatron import convert, hf_io

    path = tiny_lora_dir
    if layout == "new_sharded":
        path = str(tmp_path / "sharded")
        _rewrite_sharded_new_layout(tiny_lora_dir, path)
        assert os.path.exists(os.path.join(path, hf_io.INDEX))
    cfg = GraniteSpeechConfig.from_pretrained(path).text_config
    lora = hf_io.read_audio_lora(path)
    assert lora and all(".self_attn.q_proj." in k or ".self_attn.v_proj." in k for k in lora)
    whole = convert.read_hf_state(path, prefixes=(convert.HF_LLM,))
    for name, (a, b, scale) in lora.items():  # the reference merge on whole tensors
        whole[name] = whole[name].float() + (scale * (b.double() @ a.double())).float()
    padded = 256 * -(-cfg.vocab_size // 256)
    full = convert.hf_to_megatron_full(whole, cfg, padded)
    for tp in (1, 2, 4):
        per_rank = []
        for rank in range(tp):
            with hf_io.CheckpointReader(path, lora=lora) as reader:
                for name, ref in full.items():
                    got = convert.megatron_shard_from_hf(name, reader.read, cfg, padded, False, rank, tp)
                    assert torch.equal(got, convert.shard(name, ref, rank, tp)), (tp, rank, name)
                per_rank.append(dict(reader.bytes_read))
        for name, t in whole.items():
            on_disk = t.numel() * 4  # the tiny checkpoint is fp32
            read = [r.get(name, 0) for r in per_rank]
            if name.endswith("norm.weight"):
                assert read == [on_disk] * tp, name
            elif name.endswith("embed_tokens.weight"):  # padded-vocab rows: the last rank's share holds padding
                assert sum(read) == on_disk and max(read) <= padded // tp * cfg.hidden_size * 4, read
            else:
                assert read == [on_disk // tp] * tp, (name, read)


def test_sharded_writer_files_index_order_and_stale_files(tmp_path):
    from safetensors import safe_open

    from nemo_grpo.policy.megatron import hf_io

    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # an older single-file export in the same dir
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(4),
               "d": torch.randn(2, 2, 2)}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = hf_io.ShardedSafetensorsWriter(str(out), plan, max_shard_bytes=48)  # a (60 B) alone; b + c; d
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", tensors["b"])
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / hf_io.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for k, v in tensors.items():
        with safe_open(str(out / index["weight_map"][k]), framework="pt") as f:
            assert torch.equal(f.get_tensor(k), v) and f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="max_shard_bytes"):
        hf_io.ShardedSafetensorsWriter(str(out), plan, max_shard_bytes=0)


@pytest.mark.integration
def test_export_8b_shapes_peak_memory_and_reload(preset_8b_dir, tmp_path):
    """Export of the 8B-shaped preset (hidden 4096, vocab 49160, ffn 12800, 1 LLM layer; bf16 on disk, fp32 in the
    policy) from a subprocess: peak RSS above the pre-export RSS stays below 1.25x the largest fp32 tensor (the
    embedding, 0.81 GB; measured 0.50x — its bf16 copy. The whole-model gather it replaces: 2.29x at this depth,
    growing with depth). The files reload in transformers equal to the checkpoint: bit-identical bf16 except q/v,
    which carry the merged audio LoRA (has_lora_adapter false)."""
    from safetensors import safe_open
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.megatron import convert, hf_io

    out, res = tmp_path / "export", tmp_path / "mem.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "export_memory.py"), preset_8b_dir, str(out), str(res),
                           str(512 * 1024**2)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mem = json.loads(res.read_text())
    assert mem["largest_tensor_bytes"] == 49280 * 4096 * 4  # padded-vocab fp32 embedding
    assert mem["extra"] < 1.25 * mem["largest_tensor_bytes"], mem
    assert hf_io.INDEX in mem["files"]  # 512 MiB shards: the 0.93 GB model spans two

    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(out), dtype=torch.bfloat16)
    assert model.config.has_lora_adapter is False
    got = model.state_dict()
    lora = hf_io.read_audio_lora(preset_8b_dir)
    with safe_open(os.path.join(preset_8b_dir, "model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys()]
        for key in keys:
            name = convert.normalize_key(key)
            want = f.get_tensor(key)
            if name in lora:
                a, b, scale = lora[name]
                want = (want.float() + (scale * (b.double() @ a.double())).float()).to(want.dtype)
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert set(got) - {convert.normalize_key(k) for k in keys} == {"lm_head.weight"}  # tied to the embedding
