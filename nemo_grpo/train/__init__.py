"""Training recipes (paper Section 3): GRPO / MP-GRPO (``grpo``), SFT (``sft``), the typed config (``config``),
checkpoint/resume, logging, evaluation glue, ``nemo-grpo train`` (``cmd``) and ``nemo-grpo demo`` (``demo``).

Heavy modules are not imported here; import ``nemo_grpo.train.grpo`` etc. directly.
"""
