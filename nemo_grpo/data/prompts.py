"""Prompt templates per task (``prompts.yaml``, shipped as package data) and their seeded per-sample choice.

A template is a user message with exactly one ``<|audio|>`` (expanded later by ``policy.inputs.build_prompt_batch``
into the Granite chat template) and, for ``sqa``, exactly one ``<|question|>``. The template of a sample is a
pure function of (seed, sample id): the same cut gets the same prompt in every worker, rank and run, and
different cuts spread over all templates.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

AUDIO = "<|audio|>"
QUESTION = "<|question|>"
TASKS = ("sqa", "ast")
DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "prompts.yaml")


@dataclass(frozen=True)
class PromptTemplates:
    """Validated templates: {task: [template, ...]}."""

    templates: dict[str, tuple[str, ...]]
    seed: int = 0

    @classmethod
    def load(cls, path: str | None = None, seed: int = 0, tasks: tuple[str, ...] | None = None) -> "PromptTemplates":
        """Read and validate a prompts YAML (default: the packaged ``prompts.yaml``); errors name the entry."""
        from omegaconf import OmegaConf

        path = path or DEFAULT_PROMPTS
        raw = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping task -> list of templates")
        unknown = sorted(set(raw) - set(TASKS))
        if unknown:
            raise ValueError(f"{path}: unknown task key(s) {unknown}; known: {list(TASKS)}")
        out = {}
        for task in tasks or tuple(raw):
            items = raw.get(task)
            if not isinstance(items, list) or not items:
                raise ValueError(f"{path}: {task}: need a non-empty list of templates")
            for i, t in enumerate(items):
                validate_template(t, task, f"{path}: {task}[{i}]")
            out[task] = tuple(items)
        return cls(out, seed)

    def choose(self, task: str, key: str) -> str:
        """The template for sample ``key``: a seeded draw, stable across processes (no Python hash salt)."""
        options = self.templates.get(task)
        if options is None:
            raise ValueError(f"no prompt templates for task {task!r}; have {sorted(self.templates)}")
        digest = hashlib.sha256(f"{self.seed}\x00{key}".encode()).digest()
        return options[int.from_bytes(digest[:8], "little") % len(options)]

    def render(self, task: str, key: str, question: str | None = None) -> str:
        """The user message for one sample (``question`` required for sqa)."""
        return render(self.choose(task, key), question)


def validate_template(template: object, task: str, where: str) -> None:
    if not isinstance(template, str):
        raise ValueError(f"{where}: template must be a string, got {type(template).__name__}")
    if template.count(AUDIO) != 1:
        raise ValueError(f"{where}: template must contain exactly one {AUDIO}: {template!r}")
    want_q = 1 if task == "sqa" else 0
    if template.count(QUESTION) != want_q:
        raise ValueError(f"{where}: {task} template must contain {want_q} {QUESTION}: {template!r}")


def render(template: str, question: str | None = None) -> str:
    if QUESTION in template:
        if not question:
            raise ValueError(f"template needs a question: {template!r}")
        return template.replace(QUESTION, question)
    return template
