"""Synthetic spoken corpora in the REAL LibriSQA and CoVoST2 formats, spoken by espeak-ng.

Two tasks a ~0.44 M-parameter Granite Speech learns on CPU in minutes, each with several valid phrasings per
answer so a sentence-BLEU reward has something to optimise beyond imitation (the reference of every item is ONE
paraphrase drawn with a seeded RNG from a weighted set; all valid paraphrases are kept in an extra ``answers`` /
``translations`` field that the real formats simply do not have):

- QA (LibriSQA Part I style): the audio describes a two-object scene ("the red box is on the left and the green
  ball is on the right"); a TEXT question asks about it ("where is the red box?"); the answer is a short English
  sentence ("the red box is on the left" | "it is on the left" | ...).
- ST (CoVoST2 en->de style): the audio is an English digit sequence with a short frame ("the number is three one
  four"); the target is German ("Die Nummer ist drei eins vier" | "Die Zahl lautet drei eins vier" | ...; 2 may be
  "zwei" or "zwo").

On-disk layout (``out_dir``)::

    librispeech/train-clean-360/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac   16 kHz FLAC (LibriSpeech layout)
    librispeech/train-clean-360/<spk>/<chapter>/<spk>-<chapter>.trans.txt    "<utt-id> UPPER-CASE TRANSCRIPT"
    librispeech/test-clean/...                                               held-out speakers
    librisqa/LibriSQA-PartI-train.json, librisqa/LibriSQA-PartI-test.json     JSON list of records
    covost/covost_v2.en_de.tsv                                                path, translation, split
    covost/cv-corpus/en/validated.tsv, covost/cv-corpus/en/clips/*.mp3        Common Voice (48 or 22.05 kHz mp3)
    toy_corpora.json                                                          index: paths, sizes, seed

Deterministic given ``seed`` (espeak-ng itself is deterministic for a given text/voice/speed/pitch).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import gcd

import numpy as np

log = logging.getLogger(__name__)

TOY_VERSION = 1  # bump when the generated content changes, so cached corpora are rebuilt

# ----------------------------------------------------------------------------------------------- task content --
COLORS = ("red", "blue", "green", "yellow")
OBJECTS = ("box", "ball", "cup", "book")
SIDES = ("left", "right")

# (question template, [(answer template, weight), ...]); {c} colour, {o} object, {p} side of the asked object.
QA_QUESTIONS = (
    ("where is the {c} {o}?", (
        ("the {c} {o} is on the {p}", 0.4), ("it is on the {p}", 0.3),
        ("on the {p} side", 0.2), ("the {c} {o} is on the {p} side", 0.1))),
    ("what is on the {p}?", (
        ("the {c} {o} is on the {p}", 0.4), ("a {c} {o}", 0.3),
        ("there is a {c} {o} on the {p}", 0.2), ("the {c} {o}", 0.1))),
    ("what color is the {o}?", (
        ("the {o} is {c}", 0.4), ("it is {c}", 0.3), ("{c}", 0.2), ("the {o} is {c} in color", 0.1))),
)
QA_SCENES = (
    "the {c1} {o1} is on the left and the {c2} {o2} is on the right",
    "on the left there is a {c1} {o1} and on the right a {c2} {o2}",
)

DIGITS_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_DE = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
# (English frame, [(German frame, weight), ...]); {d} = the spoken digits.
ST_FRAMES = (
    ("the number is {d}", (("Die Nummer ist {d}", 0.5), ("Die Zahl ist {d}", 0.3), ("Die Nummer lautet {d}", 0.2))),
    ("my code is {d}", (("Mein Code ist {d}", 0.5), ("Mein Code lautet {d}", 0.3), ("Der Code ist {d}", 0.2))),
    ("room {d}", (("Zimmer {d}", 0.6), ("Raum {d}", 0.4))),
    ("call {d}", (("Ruf {d} an", 0.6), ("Rufen Sie {d} an", 0.4))),
)
ZWO_PROBABILITY = 0.3  # "zwo" is the spoken-German variant of "zwei" used to avoid confusion with "drei"

# pseudo-speakers: espeak-ng voice x variant, with a per-speaker speed (words/min) and pitch (0-99)
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland")
VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4", "klatt")
MP3_RATES = (48000, 22050)  # Common Voice clips are 48 kHz; 22.05 kHz exercises a second resampling ratio
ALT_SEP = " | "  # joins all valid translations in the extra "translations" TSV column


@dataclass(frozen=True)
class Speaker:
    spk_id: int
    voice: str  # "en-us+f2"
    speed: int
    pitch: int


@dataclass(frozen=True)
class _Job:
    text: str
    speaker: Speaker
    path: str
    sampling_rate: int
    fmt: str  # "FLAC" | "MP3"


def _weighted(rng: np.random.Generator, options) -> str:
    texts, weights = zip(*options)
    return texts[int(rng.choice(len(texts), p=np.asarray(weights) / sum(weights)))]


def _speakers(rng: np.random.Generator, n: int, first_id: int) -> list[Speaker]:
    return [
        Speaker(first_id + 7 * i, f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}",
                int(rng.integers(130, 191)), int(rng.integers(30, 71)))
        for i in range(n)
    ]


def qa_item(rng: np.random.Generator) -> dict:
    """One QA item: spoken scene text, text question, drawn reference answer and all valid answers."""
    o1, o2 = rng.choice(OBJECTS, size=2, replace=False)
    c1, c2 = rng.choice(COLORS, size=2, replace=False)
    scene = QA_SCENES[rng.integers(len(QA_SCENES))].format(c1=c1, o1=o1, c2=c2, o2=o2)
    question_t, answers_t = QA_QUESTIONS[rng.integers(len(QA_QUESTIONS))]
    c, o, p = (c1, o1, "left") if rng.random() < 0.5 else (c2, o2, "right")
    fill = dict(c=c, o=o, p=p)
    answers = [a.format(**fill) for a, _ in answers_t]
    return dict(text=scene, question=question_t.format(**fill), answer=_weighted(rng, answers_t).format(**fill),
                answers=answers)


def st_item(rng: np.random.Generator) -> dict:
    """One ST item: English sentence (spoken), drawn German reference and all valid translations."""
    digits = rng.integers(0, 10, size=int(rng.integers(3, 6)))
    en_frame, de_frames = ST_FRAMES[rng.integers(len(ST_FRAMES))]
    zwo = rng.random() < ZWO_PROBABILITY
    de_words = [("zwo" if zwo and d == 2 else DIGITS_DE[d]) for d in digits]
    sentence = en_frame.format(d=" ".join(DIGITS_EN[d] for d in digits))
    translation = _weighted(rng, de_frames).format(d=" ".join(de_words))
    alts = []
    for word2 in (("zwei", "zwo") if 2 in digits else ("zwei",)):
        d_de = " ".join(word2 if d == 2 else DIGITS_DE[d] for d in digits)
        alts += [f.format(d=d_de) for f, _ in de_frames]
    return dict(sentence=sentence, translation=translation, translations=alts)


def vocabulary_text() -> str:
    """Every word the toy tasks can put in a question, answer or translation (one line per phrase family).

    For tokenizer training: a tiny BPE that has seen these words encodes a reference in a few tokens (without
    them "Die Nummer lautet drei zwo fünf" is ~16 byte-level pieces), so a short max_new_tokens suffices.
    """
    lines = [" ".join(DIGITS_EN), " ".join(DIGITS_DE) + " zwo"]
    for color in COLORS:
        for obj in OBJECTS:
            for side in SIDES:
                fill = dict(c=color, o=obj, p=side)
                lines += [q.format(**fill) for q, _ in QA_QUESTIONS]
                lines += [a.format(**fill) for _, answers in QA_QUESTIONS for a, _ in answers]
    lines += [de.format(d="eins zwei drei") for _, frames in ST_FRAMES for de, _ in frames]
    lines += [en.format(d="one two three") for en, _ in ST_FRAMES]
    return "\n".join(dict.fromkeys(lines))


# ------------------------------------------------------------------------------------------------ synthesis --
def _espeak(text: str, speaker: Speaker) -> tuple[np.ndarray, int]:
    """Speak ``text``: float32 waveform [S] at espeak-ng's native rate (22.05 kHz)."""
    cmd = ["espeak-ng", "-v", speaker.voice, "-s", str(speaker.speed), "-p", str(speaker.pitch), "--stdout", text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, sr


def _resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    from scipy.signal import resample_poly

    if sr_in == sr_out:
        return audio
    g = gcd(sr_in, sr_out)
    return resample_poly(audio, sr_out // g, sr_in // g).astype(np.float32)


def _synth(job: _Job) -> float:
    """Write one utterance; returns its duration in seconds."""
    import soundfile as sf

    audio, sr = _espeak(job.text, job.speaker)
    audio = np.clip(_resample(audio, sr, job.sampling_rate), -1.0, 1.0)
    if job.fmt == "FLAC":
        sf.write(job.path, audio, job.sampling_rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(job.path, audio, job.sampling_rate, format="MP3", subtype="MPEG_LAYER_III")
    return round(len(audio) / job.sampling_rate, 3)


def _run_jobs(jobs: list[_Job], workers: int) -> list[float]:
    for d in {os.path.dirname(j.path) for j in jobs}:
        os.makedirs(d, exist_ok=True)
    # espeak-ng runs in a subprocess and resampling/encoding release the GIL: threads are enough
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(_synth, jobs))


# ---------------------------------------------------------------------------------------------- LibriSQA part --
def _make_librisqa(out_dir: str, rng: np.random.Generator, n_train: int, n_test: int, workers: int) -> dict:
    root = os.path.join(out_dir, "librispeech")
    records: dict[str, list[dict]] = {}
    for part, n, first_spk in (("train-clean-360", n_train, 100), ("test-clean", n_test, 1000)):
        speakers = _speakers(rng, max(2, min(24, n // 8 or 1)), first_spk)
        jobs, items, trans = [], [], {}
        for i in range(n):
            spk = speakers[i % len(speakers)]
            chapter = 1000 + spk.spk_id * 10 + (i // len(speakers)) % 2  # two chapters per speaker
            utt_id = f"{spk.spk_id}-{chapter}-{i:04d}"
            rel = f"{part}/{spk.spk_id}/{chapter}/{utt_id}.flac"
            item = qa_item(rng)
            jobs.append(_Job(item["text"], spk, os.path.join(root, rel), 16000, "FLAC"))
            items.append((rel, utt_id, item))
            trans.setdefault(os.path.join(root, part, str(spk.spk_id), str(chapter)), []).append(
                f"{utt_id} {item['text'].upper()}")
        durations = _run_jobs(jobs, workers)
        for chapter_dir, lines in trans.items():
            spk, chapter = chapter_dir.split(os.sep)[-2:]
            with open(os.path.join(chapter_dir, f"{spk}-{chapter}.trans.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        records[part] = [
            dict(speech_path=rel, question=it["question"], answer=it["answer"], text=it["text"], duration=dur,
                 answers=it["answers"])
            for (rel, _, it), dur in zip(items, durations)
        ]
    qa_dir = os.path.join(out_dir, "librisqa")
    os.makedirs(qa_dir, exist_ok=True)
    paths = {}
    for split, part in (("train", "train-clean-360"), ("test", "test-clean")):
        paths[f"{split}_json"] = os.path.join(qa_dir, f"LibriSQA-PartI-{split}.json")
        with open(paths[f"{split}_json"], "w", encoding="utf-8") as f:
            json.dump(records[part], f, indent=1, ensure_ascii=False)
    return dict(librispeech_root=root, **paths, num_train=n_train, num_test=n_test)


# ----------------------------------------------------------------------------------------------- CoVoST2 part --
CV_COLUMNS = ("client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale",
              "segment")


def _make_covost(out_dir: str, rng: np.random.Generator, n_train: int, n_test: int, workers: int) -> dict:
    cv_dir = os.path.join(out_dir, "covost", "cv-corpus", "en")
    clips = os.path.join(cv_dir, "clips")
    speakers = _speakers(rng, max(2, min(24, (n_train + 2 * n_test) // 8 or 1)), 5000)
    rates = {s: MP3_RATES[k % len(MP3_RATES)] for k, s in enumerate(speakers)}
    splits = ["train"] * n_train + ["dev"] * n_test + ["test"] * n_test
    jobs, cv_rows, covost_rows = [], [], []
    for i, split in enumerate(splits):
        spk = speakers[i % len(speakers)]
        if split == "train" and rng.random() < 0.1:
            split = "train_covost"  # CoVoST2's extra training rows; prepare treats them as train
        item = st_item(rng)
        name = f"common_voice_en_{19000000 + 37 * i}.mp3"
        client = hashlib.sha256(f"toy-speaker-{spk.spk_id}".encode()).hexdigest()
        jobs.append(_Job(item["sentence"], spk, os.path.join(clips, name), rates[spk], "MP3"))
        cv_rows.append((client, name, item["sentence"], "2", "0", "", "", "", "en", ""))
        covost_rows.append((name, item["translation"], split, ALT_SEP.join(item["translations"])))
    _run_jobs(jobs, workers)
    os.makedirs(cv_dir, exist_ok=True)
    validated = os.path.join(cv_dir, "validated.tsv")
    with open(validated, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(CV_COLUMNS)
        w.writerows(cv_rows)
    covost_tsv = os.path.join(out_dir, "covost", "covost_v2.en_de.tsv")
    with open(covost_tsv, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(("path", "translation", "split", "translations"))
        w.writerows(covost_rows)
    return dict(covost_tsv=covost_tsv, validated_tsv=validated, clips_dir=clips,
                num_train=n_train, num_dev=n_test, num_test=n_test)


# ----------------------------------------------------------------------------------------------------- entry --
def make_toy_corpora(
    out_dir: str,
    seed: int = 0,
    num_qa: int = 2000,
    num_st: int = 2000,
    num_test: int | None = None,
    workers: int = 2,
) -> dict:
    """Synthesise both toy corpora under ``out_dir`` and return their paths (also written to toy_corpora.json).

    num_qa / num_st: training items of each corpus (LibriSQA Part I train / CoVoST2 train incl. train_covost).
    num_test: items of each held-out split (LibriSQA test; CoVoST2 dev and test); default max(8, num // 5).
    Returns {"librisqa": {train_json, test_json, librispeech_root, ...}, "covost2": {covost_tsv, validated_tsv,
    clips_dir, ...}, "seed", "version"}. Reuses an existing corpus built with the same arguments.
    """
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("make_toy_corpora needs the espeak-ng binary (Debian/Ubuntu: apt-get install espeak-ng)")
    for key, val in (("num_qa", num_qa), ("num_st", num_st)):
        if int(val) < 1:
            raise ValueError(f"{key} must be >= 1, got {val}")
    if num_test is not None and int(num_test) < 1:
        raise ValueError(f"num_test must be >= 1, got {num_test}")
    out_dir = os.path.abspath(out_dir)  # the index holds absolute paths: usable from any working directory
    params = dict(version=TOY_VERSION, seed=seed, num_qa=num_qa, num_st=num_st, num_test=num_test)
    index_path = os.path.join(out_dir, "toy_corpora.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("params") == params:
            log.info("toy corpora already at %s (same parameters): reusing", out_dir)
            return index
    os.makedirs(out_dir, exist_ok=True)
    # separate streams so the QA corpus does not change when only num_st changes (and vice versa)
    qa_rng, st_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    n_qa_test = num_test or max(8, num_qa // 5)
    n_st_test = num_test or max(8, num_st // 5)
    index = dict(
        params=params,
        librisqa=_make_librisqa(out_dir, qa_rng, num_qa, n_qa_test, workers),
        covost2=_make_covost(out_dir, st_rng, num_st, n_st_test, workers),
    )
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    log.info("toy corpora written to %s: QA %d+%d, ST %d+%d+%d", out_dir, num_qa, n_qa_test, num_st, n_st_test,
             n_st_test)
    return index
