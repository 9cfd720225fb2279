"""Bounded-memory HF checkpoint I/O for the megatron backend: lazy sliced reads and streaming sharded writes.

Why: at 8B (4096 wide, 40 layers) the LLM is ~33 GB in fp32. Reading the whole checkpoint on every rank, or gathering
the whole model on every rank to export it, does not fit beside training state on an 80 GB card. Here:

* :class:`CheckpointReader` opens a HF dir (``model.safetensors`` or sharded with ``model.safetensors.index.json``,
  either key layout: see ``convert.normalize_key``) and hands out row/column SLICES of single tensors through
  safetensors' ``get_slice``: a TP rank materialises only its own shard. A PEFT audio adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``) is merged into each slice as it is read:
  ``W[a:b] += (alpha / r) * B[a:b] @ A`` (fp64 product, the sum in fp32 or wider).
* :class:`ShardedSafetensorsWriter` writes tensors one at a time into HF-style shards
  (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one ``model.safetensors``): every
  name, shape and dtype is declared up front so each shard's header precedes its data, and each tensor's bytes go
  straight from the tensor to the file (no serialised copy of the shard in memory).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import torch

from nemo_grpo.policy.megatron import convert

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a HF config says its weights are stored in (``dtype`` / ``torch_dtype``); fp32 when unset."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if value is None:
            continue
        if isinstance(value, str):
            value = getattr(torch, value.replace("torch.", ""), None)
            if not isinstance(value, torch.dtype):
                raise ValueError(f"config {key}={getattr(config, key)!r} is not a torch dtype")
        return value
    return torch.float32


def _files(model_dir: str) -> dict[str, str]:
    """On-disk key -> safetensors file name of a HF dir (sharded or single)."""
    from safetensors import safe_open

    index = os.path.join(model_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    if os.path.exists(os.path.join(model_dir, SINGLE)):
        with safe_open(os.path.join(model_dir, SINGLE), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise FileNotFoundError(f"{model_dir}: no {SINGLE} or {INDEX}")


def read_audio_lora(model_dir: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT audio adapter of a HF dir: normalised base-weight name -> (A [r, in], B [out, r], alpha / r); {} when
    the dir has no ``adapter_config.json``. Raises ValueError for DoRA / rsLoRA (not a plain B @ A update)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(model_dir, "adapter_config.json")
    if not os.path.exists(cfg_path):
        return {}
    with open(cfg_path) as f:
        acfg = json.load(f)
    if acfg.get("use_dora") or acfg.get("use_rslora"):
        raise ValueError(f"{cfg_path}: DoRA / rsLoRA adapters are not supported by the megatron backend")
    scale = float(acfg["lora_alpha"]) / float(acfg["r"])
    adapter = load_file(os.path.join(model_dir, "adapter_model.safetensors"))  # r x (in + out) per matrix: small
    out = {}
    for key, a in adapter.items():
        if key.endswith("lora_A.weight"):
            base = convert.normalize_key(key[len("base_model.model."):].replace(".lora_A.weight", ".weight"))
            out[base] = (a, adapter[key.replace("lora_A", "lora_B")], scale)
    return out


class CheckpointReader:
    """Lazy, sliced access to a HF Granite Speech checkpoint dir by normalised (transformers-5) tensor name.

    ``bytes_read`` counts the bytes materialised per normalised name (what a test asserts on: a TP rank reads only
    its own slices). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, model_dir: str, lora: dict | None = None):
        self.model_dir = model_dir
        self._where = {convert.normalize_key(k): (fname, k) for k, fname in _files(model_dir).items()}
        self._handles: dict[str, object] = {}
        self.lora = lora or {}
        self.bytes_read: dict[str, int] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        from safetensors import safe_open

        if name not in self._where:
            raise ValueError(f"{self.model_dir}: checkpoint has no tensor {name!r} (nor its legacy name "
                             f"{convert.to_legacy_key(name)!r})")
        fname, key = self._where[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.model_dir, fname), framework="pt")
        return self._handles[fname].get_slice(key)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
             ) -> torch.Tensor:
        """``tensor[rows[0]:rows[1], cols[0]:cols[1]]`` (whole dims when None), only that slice read from disk.

        A merged LoRA adapter targeting ``name`` is added on the same slice; the result is then fp32 (or the
        checkpoint's dtype when wider), since adding a rank-r update in bf16 would round most of it away."""
        sl = self._slice(name)
        if rows is None and cols is None:
            t = sl[...] if sl.get_shape() else self._handles[self._where[name][0]].get_tensor(self._where[name][1])
        else:
            t = sl[(slice(*rows) if rows else slice(None),) + ((slice(*cols),) if cols else ())]
        self.bytes_read[name] = self.bytes_read.get(name, 0) + t.numel() * t.element_size()
        if name in self.lora:
            a, b, scale = self.lora[name]
            b = b[rows[0]:rows[1]] if rows else b
            a = a[:, cols[0]:cols[1]] if cols else a
            wide = torch.promote_types(t.dtype, torch.float32)
            t = t.to(wide) + (scale * (b.double() @ a.double())).to(wide)
        return t

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (normalised names, prefix stripped), whole: for the small replicated
        encoder / projector."""
        return {k[len(prefix):]: self.read(k) for k in self._where if k.startswith(prefix)}


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """Streams tensors, in a declared order, into HF safetensors shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own).

    ``plan``: (on-disk name, shape, dtype) in the order :meth:`write` will be called. Files are
    ``model.safetensors`` when everything fits one shard, else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` (transformers' layout). Stale model shards / index in ``out_dir`` are removed
    first (a loader could otherwise pick an old ``model.safetensors`` over a new index). Memory: the tensor being
    written, nothing else (its bytes go to the file through a zero-copy view).
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        names = [p[0] for p in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the export plan")
        for _, _, dtype in plan:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"dtype {dtype} has no safetensors code")
        self.out_dir = out_dir
        self.metadata = dict(metadata or {"format": "pt"})
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nb = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nb
        n = len(shards)
        self._files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._order = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self._pos = 0
        self._fh = None
        self.total_size = sum(_nbytes(s, d) for _, s, d in plan)
        os.makedirs(out_dir, exist_ok=True)
        for fname in os.listdir(out_dir):
            if fname == INDEX or (fname.startswith("model") and fname.endswith(".safetensors")):
                os.remove(os.path.join(out_dir, fname))

    def _open(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in self._shards[shard]:
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
            offset += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._fh = open(os.path.join(self.out_dir, self._files[shard]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (CPU; same name, shape and dtype as planned)."""
        if self._pos >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        shard, (want, shape, dtype) = self._order[self._pos]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"export order: expected {want} {tuple(shape)} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._fh is None:
            self._open(shard)
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            # bytes through a uint8 view (numpy has no bf16); little-endian, as safetensors stores them
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1
        if self._pos == len(self._order) or self._order[self._pos][0] != shard:
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Check every planned tensor was written; write the index when sharded. Returns the shard file names."""
        if self._pos != len(self._order):
            missing = [e[0] for _, e in self._order[self._pos:]]
            raise ValueError(f"export incomplete: {len(missing)} planned tensors not written, e.g. {missing[:3]}")
        if len(self._files) > 1:
            weight_map = {name: self._files[i] for i, (name, _, _) in self._order}
            with open(os.path.join(self.out_dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)
        return list(self._files)
