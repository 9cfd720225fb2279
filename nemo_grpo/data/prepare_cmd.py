"""``nemo-grpo prepare {librisqa,covost2,toy}``: write lhotse manifests (and, for toy, synthesise the corpora first).

    nemo-grpo prepare librisqa --train-json PartI-train.json --test-json PartI-test.json \\
        --librispeech-root LibriSpeech --out-dir data/librisqa/manifests
    nemo-grpo prepare covost2 --covost-tsv covost_v2.en_de.tsv --validated-tsv cv/en/validated.tsv \\
        --clips-dir cv/en/clips --out-dir data/covost2/manifests
    nemo-grpo prepare toy --out-dir data/toy [--num-qa 2000 --num-st 2000 --seed 0]
        -> data/toy/raw (LibriSQA/LibriSpeech + CoVoST/Common Voice files), data/toy/manifests (both corpora)

Exit status 0 on success; bad items are skipped and reported (``<corpus>_skipped.json``) unless ``--strict``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    p.add_argument("--max-duration", type=float, default=40.0, help="longest audio kept, seconds (default 40)")
    p.add_argument("--header-only", action="store_true",
                   help="check audio headers only (faster; corrupt payloads are then caught at load time)")
    p.add_argument("--num-jobs", type=int, default=2, help="parallel audio checks (default 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="corpus", metavar="CORPUS", required=True)
    p = sub.add_parser("librisqa", help="LibriSQA Part I JSON + LibriSpeech -> lhotse (train/valid/test)")
    p.add_argument("--train-json", required=True)
    p.add_argument("--test-json", required=True)
    p.add_argument("--librispeech-root", required=True, help="dir holding train-clean-360/, test-clean/, ...")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the 80/20 train/valid split")
    p.add_argument("--valid-fraction", type=float, default=0.2)
    _common(p)
    p = sub.add_parser("covost2", help="CoVoST2 en-de TSV + Common Voice validated.tsv/clips -> lhotse")
    p.add_argument("--covost-tsv", required=True, help="covost_v2.en_de.tsv")
    p.add_argument("--validated-tsv", required=True, help="Common Voice en validated.tsv")
    p.add_argument("--clips-dir", required=True, help="Common Voice en clips/ (mp3)")
    p.add_argument("--out-dir", required=True)
    _common(p)
    p = sub.add_parser("toy", help="synthesise espeak-ng toy corpora in both formats, then prepare them")
    p.add_argument("--out-dir", required=True, help="writes OUT/raw and OUT/manifests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-qa", type=int, default=2000, help="LibriSQA-style training items")
    p.add_argument("--num-st", type=int, default=2000, help="CoVoST-style training items")
    p.add_argument("--num-test", type=int, default=None, help="items per held-out split (default num/5, >= 8)")
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes")
    _common(p)


def _print_result(corpus: str, result: dict) -> None:
    skipped = result["skipped"]
    print(f"{corpus}: {'reused' if result['reused'] else 'wrote'} " +
          ", ".join(f"{s}={p}" for s, p in result["cuts"].items()))
    print(f"{corpus}: skipped {skipped['total']}" +
          (f" {skipped['counts']}" if skipped["total"] else ""))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # DataError (strict) is a ValueError: the message names the item
        print(f"nemo-grpo prepare {args.corpus}: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    common = dict(strict=args.strict, max_duration=args.max_duration, decode_audio=not args.header_only,
                  num_jobs=args.num_jobs, force=args.force)
    if args.corpus == "librisqa":
        _print_result("librisqa", prepare_librisqa(args.train_json, args.test_json, args.librispeech_root,
                                                   args.out_dir, seed=args.seed,
                                                   valid_fraction=args.valid_fraction, **common))
    elif args.corpus == "covost2":
        _print_result("covost2", prepare_covost2(args.covost_tsv, args.validated_tsv, args.clips_dir,
                                                 args.out_dir, **common))
    else:
        from nemo_grpo.data.toy import make_toy_corpora

        index = make_toy_corpora(os.path.join(args.out_dir, "raw"), seed=args.seed, num_qa=args.num_qa,
                                 num_st=args.num_st, num_test=args.num_test, workers=args.workers)
        manifests = os.path.join(args.out_dir, "manifests")
        qa, st = index["librisqa"], index["covost2"]
        _print_result("librisqa", prepare_librisqa(qa["train_json"], qa["test_json"], qa["librispeech_root"],
                                                   manifests, seed=args.seed, **common))
        _print_result("covost2", prepare_covost2(st["covost_tsv"], st["validated_tsv"], st["clips_dir"],
                                                 manifests, **common))
    return 0
