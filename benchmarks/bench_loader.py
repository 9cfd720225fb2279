"""Data-loader throughput with on-the-fly audio decoding, resampling, log-mel features and prompt building.

Corpus: espeak-ng toy corpora (``make_toy_corpora``: 16 kHz FLAC for LibriSQA-style QA, 48/22.05 kHz MP3 for
CoVoST-style ST) prepared with ``prepare_librisqa`` / ``prepare_covost2``. Loaders, all from the shipped
``conf/data/toy.yaml`` through ``build_dataloader``:

- ``train``: NeMo ``get_lhotse_dataloader_from_config`` (input_cfg blend of both corpora, DynamicBucketingSampler),
  ``num_workers`` 0 and 1 (1 = decoding/features in a background process, what a training step would overlap);
- ``valid``/``test`` style: the sequential (fixed-order) evaluation loader.

Reported per loader: utterances/s and x real time (audio seconds per wall second), median of ``--repeats`` full
passes after one warm-up pass; plus a per-stage split of the single-process dataset (audio load + resample,
features + prompt tokens) measured inside ``SpeechPromptDataset``. Not a test: numbers go to
``benchmarks/results/bench_loader.{json,md}``.

    python benchmarks/bench_loader.py [--num 400] [--repeats 3] [--corpus-dir DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "bench_loader"


def prepare(corpus_dir: str, manifest_dir: str, num: int) -> None:
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa
    from nemo_grpo.data.toy import make_toy_corpora

    index = make_toy_corpora(corpus_dir, seed=0, num_qa=num, num_st=num)  # reuses a same-size corpus
    qa, st = index["librisqa"], index["covost2"]
    prepare_librisqa(qa["train_json"], qa["test_json"], qa["librispeech_root"], manifest_dir)
    prepare_covost2(st["covost_tsv"], st["validated_tsv"], st["clips_dir"], manifest_dir)


def data_config(manifest_dir: str, batch_size: int, num_workers: int) -> dict:
    import yaml

    with open(common.REPO / "conf" / "data" / "toy.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["manifest_dir"] = manifest_dir
    cfg["train"].update(batch_size=batch_size, num_workers=num_workers)
    # the eval loader over the TRAIN cuts, so both loaders see the same audio
    cfg["test"] = {"sequential": True, "batch_size": batch_size,
                   "input_cfg": [dict(entry) for entry in cfg["train"]["input_cfg"]]}
    for entry in cfg["test"]["input_cfg"]:
        entry.pop("weight", None), entry.pop("tags", None)
    return cfg


def one_pass(cfg: dict, split: str, tok, model_config) -> tuple[float, int, float, int]:
    """(seconds, utterances, audio seconds, skipped) for one full pass of a freshly built loader."""
    from nemo_grpo.data.dataset import build_dataloader

    loader = build_dataloader(cfg, tok, model_config, split=split, seed=0)
    n = 0
    audio_s = 0.0
    t0 = time.perf_counter()
    for batch in loader:
        n += len(batch)
        audio_s += sum(_DURATIONS[i] for i in batch.ids)  # the cuts' real durations (features are padded)
    return time.perf_counter() - t0, n, audio_s, loader.skips.total


_DURATIONS: dict[str, float] = {}  # cut id -> seconds, filled from the manifests before timing


def stage_split(manifest_dir: str, tok, model_config, batch_size: int) -> dict:
    """Seconds per utterance in the single-process dataset: audio load + resample vs features + prompt."""
    from lhotse import CutSet

    from nemo_grpo.data.dataset import SpeechPromptDataset
    from nemo_grpo.data.prompts import PromptTemplates
    from nemo_grpo.data.validation import SkipReport

    ds = SpeechPromptDataset(tok, model_config, PromptTemplates.load(seed=0), max_audio_duration=20.0)
    out = {}
    for corpus in ("librisqa", "covost2"):
        cuts = list(CutSet.from_file(os.path.join(manifest_dir, f"{corpus}_cuts_train.jsonl.gz")))
        t_load = t_build = 0.0
        for i in range(0, len(cuts), batch_size):
            chunk = cuts[i:i + batch_size]
            t0 = time.perf_counter()
            samples = [ds._load(c, SkipReport("bench")) for c in chunk]
            t1 = time.perf_counter()
            ds._build([s for s in samples if s is not None])
            t_build += time.perf_counter() - t1
            t_load += t1 - t0
        audio = sum(c.duration for c in cuts)
        out[corpus] = {"utterances": len(cuts), "audio_s": round(audio, 2),
                       "load_resample_ms_per_utt": round(1e3 * t_load / len(cuts), 3),
                       "features_prompt_ms_per_utt": round(1e3 * t_build / len(cuts), 3),
                       "x_real_time": round(audio / (t_load + t_build), 1)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=400, help="toy training items per corpus")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--corpus-dir", default=None, help="keep/reuse the toy corpora here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (checks the script runs)")
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.smoke:
        args.num, args.repeats = 8, 1
    logging.basicConfig(level=logging.WARNING)
    getattr(common, "quiet", lambda: None)()
    rec = common.record(NAME, args)
    from lhotse import CutSet
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = args.corpus_dir or os.path.join(tmp, "toy")
        manifests = os.path.join(tmp, "manifests")
        t_prep0 = time.perf_counter()
        prepare(corpus_dir, manifests, args.num)
        rec["prepare_s"] = round(time.perf_counter() - t_prep0, 2)
        for corpus in ("librisqa", "covost2"):
            for c in CutSet.from_file(os.path.join(manifests, f"{corpus}_cuts_train.jsonl.gz")):
                _DURATIONS[c.id] = c.duration
        model_dir = common.make_tiny_model(os.path.join(tmp, "tiny"))
        tok, model_config = AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
        loaders = {}
        for label, split, workers in (("NeMo lhotse, bucketing, num_workers=0", "train", 0),
                                      ("NeMo lhotse, bucketing, num_workers=1", "train", 1),
                                      ("sequential eval loader", "test", 0)):
            cfg = data_config(manifests, args.batch_size, workers)
            one_pass(cfg, split, tok, model_config)  # warm-up (imports, page cache, worker start)
            runs = [one_pass(cfg, split, tok, model_config) for _ in range(args.repeats)]
            secs = [r[0] for r in runs]
            n, audio_s, skipped = runs[0][1], runs[0][2], runs[0][3]
            med = common.median(secs)
            loaders[label] = {"utterances": n, "audio_s": round(audio_s, 2), "skipped": skipped,
                              "seconds": common.summary(secs), "utt_per_s": round(n / med, 1),
                              "x_real_time": round(audio_s / med, 1)}
        rec["loaders"] = loaders
        rec["stages"] = stage_split(manifests, tok, model_config, args.batch_size)

    md = common.md_header(rec, "Data loader throughput (on-the-fly decoding, resampling, log-mel, prompts)")
    md += [f"Toy corpora: {args.num} QA (16 kHz FLAC) + {args.num} ST (48/22.05 kHz MP3 -> 16 kHz) training "
           f"utterances; batch size {args.batch_size}; median of {args.repeats} passes after a warm-up pass; "
           f"torch threads 1. Synthesising (espeak-ng) + preparing both corpora (audio fully decoded and checked) "
           f"took {rec['prepare_s']} s.",
           "", "| loader | utterances | audio s | utt/s | x real time | skipped |", "|---|---|---|---|---|---|"]
    for label, r in loaders.items():
        md.append(f"| {label} | {r['utterances']} | {r['audio_s']} | {r['utt_per_s']} | {r['x_real_time']} | "
                  f"{r['skipped']} |")
    md += ["", "Per-stage cost inside `SpeechPromptDataset` (single process):", "",
           "| corpus | audio load + resample ms/utt | features + prompt ms/utt | x real time |", "|---|---|---|---|"]
    for corpus, r in rec["stages"].items():
        md.append(f"| {corpus} | {r['load_resample_ms_per_utt']} | {r['features_prompt_ms_per_utt']} | "
                  f"{r['x_real_time']} |")
    md += ["", "With `num_workers=1` the decoding runs in a second process; on this 2-core shared box that mostly "
           "measures process hand-off, in training it overlaps the GRPO step."]
    path = common.write_results(NAME, rec, md, args.out)
    print(f"wrote {path}")
    return rec


if __name__ == "__main__":
    main()
