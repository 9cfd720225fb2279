"""Corpus preparation (LibriSQA, CoVoST2, toy), prompt templates and the lhotse dataset yielding PromptBatch.

- ``toy.make_toy_corpora(out_dir, seed, num_qa, num_st, num_test)``: espeak-ng speech in the real LibriSQA /
  LibriSpeech and CoVoST2 / Common Voice formats (two tasks with several valid phrasings per answer).
- ``prepare_librisqa.prepare_librisqa(...)`` / ``prepare_covost2.prepare_covost2(...)``: lhotse manifests
  ``<out>/<corpus>_cuts_<split>.jsonl.gz`` (+ recordings, supervisions, ``<corpus>_skipped.json``).
- ``prompts.PromptTemplates``: per-task templates from ``prompts.yaml``, chosen per sample with a seeded hash.
- ``dataset.build_dataloader(data_cfg, tokenizer, model_config, split=, seed=, dp_rank=, dp_world_size=)``:
  PromptBatch iterables through NeMo's lhotse dataloader (or a fixed-order evaluation loader); ``.skips`` counts
  what was dropped.
- ``validation``: the skip reasons, ``SkipReport``, ``DataError`` (strict mode) and the audio checks.
Modules import lhotse/NeMo lazily so ``import nemo_grpo.data`` stays cheap.
"""
