"""Grouped hypothesis/reference pairs like a GRPO batch: B references x G perturbed samples, English and German."""
import random

import pytest

EN_REFS = [
    "The red box is on the left of the blue chair.",
    "He said that the meeting would start at 10:30 a.m. on Monday.",
    "Cats are running quickly through the gardens, aren't they?",
    "It is a guide to action that ensures that the military will forever heed Party commands.",
]
DE_REFS = [
    "Die Straße ist „schön“ und sehr groß.",
    "Er sagte, dass die Besprechung um 10:30 Uhr beginnen würde.",
    "Über den Fluß führt eine alte Brücke aus Stein.",
    "Größere Mädchen laufen schneller über die Wiese.",
]
_EXTRA = {"en": ["green", "table", "quickly", "the", "is", "running"],
          "de": ["grün", "Tisch", "schnell", "die", "ist"]}


def _perturb(ref: str, rng: random.Random, lang: str) -> str:
    words = ref.split()
    op = rng.randrange(5)
    if op == 0:
        return ref  # exact copy: BLEU 1
    if op == 1:
        words = [w for w in words if rng.random() > 0.3]
    elif op == 2:
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    elif op == 3:
        words[rng.randrange(len(words))] = rng.choice(_EXTRA[lang])
    else:
        words = words[: rng.randrange(1, len(words))] + [rng.choice(_EXTRA[lang])]
    return " ".join(words)


def make_group_batch(lang: str, group_size: int = 6, seed: int = 0) -> tuple[list[str], list[str]]:
    """N = B*G pairs (B=4): each group repeats its reference; includes duplicates, '' and whitespace-only samples."""
    rng = random.Random(seed)
    refs_b = EN_REFS if lang == "en" else DE_REFS
    hyps, refs = [], []
    for b, ref in enumerate(refs_b):
        group = [_perturb(ref, rng, lang) for _ in range(group_size - 2)]
        group += [group[0], "" if b % 2 == 0 else "  \t "]  # duplicate sample + blank sample
        hyps += group
        refs += [ref] * group_size
    return hyps, refs


@pytest.fixture(params=["en", "de"])
def lang_batch(request):
    hyps, refs = make_group_batch(request.param)
    return request.param, hyps, refs


@pytest.fixture
def group_batch():
    """The batch factory itself: group_batch(lang, group_size=6, seed=0) -> (hyps, refs)."""
    return make_group_batch
