"""megatron-core backend (``model.backend: megatron``): Granite Speech with the LLM tensor/sequence parallel.

Modules: ``cpu_shims`` (CUDA hard-codes, CPU only), ``parallel`` (process groups), ``model`` (Granite GPTModel),
``convert`` (HF <-> megatron weights, TP shard/unshard), ``policy`` (``MegatronGraniteSpeechPolicy``).
Imports are lazy: importing this package does not import megatron.
"""
