"""Granite Speech policies: the interface (``base``), features/inputs shared by backends, the HF backend (``hf``),
tiny offline checkpoints (``tiny``) and the backend-agnostic KV-cache sampler (``sampling``).

Heavy modules are not imported here; import ``nemo_grpo.policy.hf`` etc. directly.
"""
from nemo_grpo.policy.base import Completions, Policy, PromptBatch, PromptContext

__all__ = ["Completions", "Policy", "PromptBatch", "PromptContext"]
