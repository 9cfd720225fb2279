"""nemo_grpo: GRPO and Mixed-Policy GRPO for speech-aware LLMs (IBM Granite Speech).

Map of the package (data flows one way: batch -> rollout -> rewards -> advantages -> loss -> optimizer):

- ``policy/``      the policy interface (``base.py``) and its backends: ``hf.py`` (transformers) and ``megatron/``
- ``rollout.py``   G completions per prompt with audio encoded once; log-probs recorded at sampling time
- ``rewards/``     text-similarity rewards (BLEU, chrF, ROUGE, METEOR, BERTScore) by name, as a weighted mix
- ``algorithms/``  pure tensor code: group advantages, the DAPO/GRPO token loss, KL, mixed-policy terms
- ``data/``        corpus preparation (LibriSQA, CoVoST2, toy), prompts, the lhotse dataset
- ``train/``       the GRPO and SFT recipes, checkpointing, logging
- ``evaluation/``  corpus metrics and the paper-style tables
- ``cli.py``       the ``nemo-grpo`` command
"""

__version__ = "0.1.0"
