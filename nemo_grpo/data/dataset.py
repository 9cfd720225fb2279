"""The lhotse dataset that turns a CutSet into a ``PromptBatch``, and the loaders built from a data YAML.

``SpeechPromptDataset.__getitem__(cuts)`` loads each cut's audio (resampled to 16 kHz, channel 0), renders its
prompt from the task's templates (seeded per cut), and calls ``policy.inputs.build_prompt_batch`` (log-mel features,
Granite chat template, ``<|audio|>`` expansion, left padding). A bad cut is DROPPED and counted, never raised:
missing/corrupt audio, zero-length or overlong audio, empty question/reference, unknown task, or a prompt over
``max_prompt_tokens``. The skips travel with the batch (``batch.skipped``, a SkipReport dict, so they survive
DataLoader worker processes) and ``PromptLoader`` sums them into ``loader.skips`` for the training log.

Data config (one YAML, e.g. ``conf/data/toy.yaml``)::

    manifest_dir: data/toy/manifests   # relative cuts_path entries are resolved against it
    prompts: null                      # prompts YAML; null = the packaged nemo_grpo/data/prompts.yaml
    system_prompt: null
    max_prompt_tokens: 256             # the paper's prompt length (audio tokens included)
    max_audio_duration: 30.0           # seconds; longer cuts are counted skips
    train: {...}                       # a NeMo lhotse dataloader config (input_cfg blends, bucketing, ...)
    valid: {sequential: true, batch_size: 16, input_cfg: [...]}   # fixed order, every cut exactly once
    test:  {...}

Shape legend: B prompts, P prompt tokens, S audio samples, F feature frames, A audio tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

import torch

from nemo_grpo.data.prompts import PromptTemplates
from nemo_grpo.data.validation import MIN_SAMPLES, SkipReport, clean_text

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
TOP_KEYS = {"manifest_dir", "prompts", "system_prompt", "max_prompt_tokens", "max_audio_duration",
            "train", "valid", "test"}
SEQUENTIAL_KEYS = {"sequential", "input_cfg", "cuts_path", "batch_size"}
REFERENCE_KEY = {"sqa": "answer", "ast": "translation"}


@dataclasses.dataclass
class EmptyBatch:
    """What the dataset returns when every cut of a sampled batch was bad (the loader drops it, counting skips)."""

    ids: list[str]


class SpeechPromptDataset(torch.utils.data.Dataset):
    """lhotse-style dataset: ``__getitem__(CutSet) -> PromptBatch`` (or ``EmptyBatch``), with ``.skipped`` attached."""

    def __init__(self, tokenizer: Any, model_config: Any, templates: PromptTemplates, *,
                 max_prompt_tokens: int = 256, max_audio_duration: float = 30.0, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.templates = templates
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_audio_duration = float(max_audio_duration)
        self.system_prompt = system_prompt
        self.skips = SkipReport("load")  # in-process total (with num_workers > 0 use PromptLoader.skips)

    def __getitem__(self, cuts) -> Any:
        report = SkipReport("load")
        samples = [s for s in (self._load(cut, report) for cut in cuts) if s is not None]
        batch = self._collate(samples, report) if samples else None
        out = batch if batch is not None else EmptyBatch([c.id for c in cuts])
        out.skipped = report.to_dict()  # plain attribute: pickles with the batch across worker processes
        self.skips.merge(report)
        return out

    def _load(self, cut, report: SkipReport) -> tuple | None:
        """(waveform [S], user message, reference, id) or None after a counted skip."""
        if len(cut.supervisions) == 0:
            report.skip("malformed_row", cut.id, "cut has no supervision")
            return None
        custom = cut.supervisions[0].custom or {}
        task = custom.get("task") or (cut.custom or {}).get("task")
        if task not in REFERENCE_KEY or task not in self.templates.templates:
            report.skip("malformed_row", cut.id, f"unknown task {task!r}")
            return None
        reference = clean_text(custom.get(REFERENCE_KEY[task]))
        question = clean_text(custom.get("question")) if task == "sqa" else None
        if reference is None or (task == "sqa" and question is None):
            report.skip("empty_text", cut.id, f"empty {'question' if reference else REFERENCE_KEY[task]}")
            return None
        if not cut.duration > 0:
            report.skip("zero_length", cut.id, f"duration {cut.duration}")
            return None
        if cut.duration > self.max_audio_duration:
            report.skip("too_long", cut.id, f"{cut.duration:.2f} s > {self.max_audio_duration} s")
            return None
        wave = self._audio(cut, report)
        if wave is None:
            return None
        return wave, self.templates.render(task, cut.id, question), reference, cut.id

    @staticmethod
    def _audio(cut, report: SkipReport) -> torch.Tensor | None:
        # lhotse wraps a missing file in a generic loading error: check first so the reason is precise
        for src in getattr(cut.recording, "sources", None) or []:
            if src.type == "file" and not os.path.exists(src.source):
                report.skip("missing_file", cut.id, src.source)
                return None
        try:
            audio = cut.resample(SAMPLING_RATE).load_audio()  # [C, S] float32 numpy
        except Exception as e:  # lhotse/soundfile raise many types for undecodable audio
            report.skip("corrupt_audio", cut.id, f"{type(e).__name__}: {e}"[:300])
            return None
        wave = torch.from_numpy(audio[0].copy()) if audio.ndim == 2 else torch.from_numpy(audio.copy())
        if wave.numel() < MIN_SAMPLES:
            report.skip("zero_length", cut.id, f"{wave.numel()} samples")
            return None
        if not torch.isfinite(wave).all():
            report.skip("corrupt_audio", cut.id, "non-finite samples")
            return None
        return wave

    def _build(self, samples: list[tuple]):
        from nemo_grpo.policy.inputs import build_prompt_batch

        waves, messages, refs, ids = zip(*samples)
        return build_prompt_batch(self.tokenizer, list(waves), list(messages), list(refs), list(ids),
                                  self.model_config, max_prompt_tokens=self.max_prompt_tokens,
                                  system_prompt=self.system_prompt)

    def _collate(self, samples: list[tuple], report: SkipReport):
        try:
            return self._build(samples)
        except ValueError:
            pass  # some prompt is bad: find which one(s) alone, skip them, batch the rest (rare path)
        good = []
        for sample in samples:
            try:
                self._build([sample])
                good.append(sample)
            except ValueError as e:
                reason = "prompt_too_long" if "max_prompt_tokens" in str(e) else "malformed_row"
                report.skip(reason, sample[3], str(e))
        return self._build(good) if good else None


class PromptLoader:
    """Iterates PromptBatch from an underlying loader, dropping empty batches and summing skips into ``skips``."""

    def __init__(self, loader: Any, name: str):
        self.loader = loader
        self.skips = SkipReport(name)

    def __iter__(self) -> Iterator[Any]:
        """Each skipped cut is logged as it happens (by the dataset); a finished pass logs the totals."""
        for batch in self.loader:
            skipped = getattr(batch, "skipped", None)
            if skipped is not None:
                self.skips.merge(skipped)
                del batch.skipped
            if isinstance(batch, EmptyBatch):
                continue
            yield batch
        (log.warning if self.skips.total else log.info)("pass finished: %s", self.skips.summary())


class SequentialCutLoader:
    """Fixed-order batches of ``batch_size`` cuts, every cut exactly once (this rank's share: cut i % world == rank)."""

    def __init__(self, cut_paths: list[str], dataset: SpeechPromptDataset, batch_size: int, rank: int, world: int):
        self.cut_paths, self.dataset, self.batch_size = cut_paths, dataset, batch_size
        self.rank, self.world = rank, world

    def __iter__(self):
        from lhotse import CutSet

        chunk = []
        index = 0
        for path in self.cut_paths:
            for cut in CutSet.from_file(path) or []:  # lhotse reads an empty manifest back as None
                if index % self.world == self.rank:
                    chunk.append(cut)
                index += 1
                if len(chunk) == self.batch_size:
                    yield self.dataset[CutSet.from_cuts(chunk)]
                    chunk = []
        if chunk:
            yield self.dataset[CutSet.from_cuts(chunk)]


# ----------------------------------------------------------------------------------------------- config side --
def _resolve_inputs(node: Any, manifest_dir: str, where: str) -> Any:
    """Copy of an input_cfg list/dict with relative ``cuts_path`` entries joined to ``manifest_dir``."""
    if isinstance(node, list):
        return [_resolve_inputs(n, manifest_dir, f"{where}[{i}]") for i, n in enumerate(node)]
    if isinstance(node, dict):
        out = {k: _resolve_inputs(v, manifest_dir, f"{where}.{k}") for k, v in node.items()}
        path = out.get("cuts_path")
        if isinstance(path, str) and not os.path.isabs(path):
            out["cuts_path"] = os.path.join(manifest_dir, path)
        if isinstance(out.get("cuts_path"), str) and not os.path.exists(out["cuts_path"]):
            raise ValueError(f"{where}.cuts_path: no such file: {out['cuts_path']}")
        return out
    return node


def _cut_paths(section: dict, where: str) -> list[str]:
    paths = [section["cuts_path"]] if section.get("cuts_path") else []
    for i, entry in enumerate(section.get("input_cfg") or []):
        if entry.get("type", "lhotse") != "lhotse" or "cuts_path" not in entry:
            raise ValueError(f"{where}.input_cfg[{i}]: sequential mode reads only type=lhotse entries with cuts_path")
        paths.append(entry["cuts_path"])
    if not paths:
        raise ValueError(f"{where}: needs input_cfg (or cuts_path)")
    return paths


def validate_data_config(data_cfg: Any) -> dict:
    """Plain-dict copy of the data config; unknown keys / bad values raise ValueError naming the key."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise ValueError(f"data config: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    if int(cfg.get("max_prompt_tokens", 256)) < 1:
        raise ValueError(f"data.max_prompt_tokens must be >= 1, got {cfg.get('max_prompt_tokens')}")
    if not float(cfg.get("max_audio_duration", 30.0)) > 0:
        raise ValueError(f"data.max_audio_duration must be > 0, got {cfg.get('max_audio_duration')}")
    return cfg


def _nemo_keys() -> set[str]:
    from nemo.collections.common.data.lhotse.dataloader import LhotseDataLoadingConfig

    return {f.name for f in dataclasses.fields(LhotseDataLoadingConfig)}


def build_dataloader(data_cfg: Any, tokenizer: Any, model_config: Any, *, split: str, seed: int,
                     dp_rank: int = 0, dp_world_size: int = 1) -> PromptLoader:
    """An iterable of ``PromptBatch`` for ``split`` (train | valid | test) of the data config.

    A section with ``sequential: true`` yields fixed-order batches (every cut exactly once, this rank's share);
    otherwise it is handed to NeMo's ``get_lhotse_dataloader_from_config`` (input_cfg blends, dynamic duration
    bucketing), with ``seed`` and ``shard_seed`` set from ``seed`` so every rank samples the same way.
    ``loader.skips`` holds what was dropped so far (a SkipReport).
    """
    cfg = validate_data_config(data_cfg)
    if split not in ("train", "valid", "test") or not isinstance(cfg.get(split), dict):
        have = [k for k in ("train", "valid", "test") if k in cfg]
        raise ValueError(f"data.{split}: missing split section (have {have})")
    section = _resolve_inputs(dict(cfg[split]), str(cfg.get("manifest_dir") or "."), f"data.{split}")
    templates = PromptTemplates.load(cfg.get("prompts"), seed=seed)
    dataset = SpeechPromptDataset(
        tokenizer, model_config, templates, max_prompt_tokens=cfg.get("max_prompt_tokens", 256),
        max_audio_duration=cfg.get("max_audio_duration", 30.0), system_prompt=cfg.get("system_prompt"))
    if section.get("sequential"):
        bad = sorted(set(section) - SEQUENTIAL_KEYS)
        if bad:
            raise ValueError(f"data.{split}: key(s) {bad} not allowed with sequential: true "
                             f"(allowed: {sorted(SEQUENTIAL_KEYS)})")
        batch_size = int(section.get("batch_size") or 0)
        if batch_size < 1:
            raise ValueError(f"data.{split}.batch_size must be >= 1 with sequential: true")
        loader = SequentialCutLoader(_cut_paths(section, f"data.{split}"), dataset, batch_size, dp_rank,
                                     dp_world_size)
        return PromptLoader(loader, f"load/{split}")
    section.pop("sequential", None)
    bad = sorted(set(section) - _nemo_keys())
    if bad:
        raise ValueError(f"data.{split}: unknown key(s) {bad} (not NeMo lhotse dataloader options)")
    from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config

    section.update(seed=seed, shard_seed=seed, sample_rate=SAMPLING_RATE)
    loader = get_lhotse_dataloader_from_config(section, global_rank=dp_rank, world_size=dp_world_size,
                                               dataset=dataset)
    return PromptLoader(loader, f"load/{split}")
