"""megatron-core backend (``model.backend: megatron``): Granite Speech with the LLM tensor/sequence parallel.

Modules: ``cpu_shims`` (CUDA hard-codes, CPU only), ``parallel`` (process groups), ``model`` (Granite GPTModel),
``convert`` (HF <-> megatron weights, TP shard/unshard), ``policy`` (``MegatronGraniteSpeechPolicy``).
Importing this package does not import megatron-core (it is imported inside functions).
"""

from nemo_grpo.policy.megatron.policy import MegatronGraniteSpeechPolicy, build_policy  # noqa: E402

__all__ = ["MegatronGraniteSpeechPolicy", "build_policy"]
