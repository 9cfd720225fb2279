"""``MegatronGraniteSpeechPolicy``: ``base.Policy`` with the Granite LLM as a tensor-parallel megatron GPTModel.

Same semantics as the HF backend (``nemo_grpo/policy/hf.py``), checked against it in ``tests/megatron``:
  * the speech encoder (frozen, eval: BatchNorm statistics fixed) runs once per prompt in ``encode``; the Q-Former
    projector runs once per prompt per forward; both are the HF modules, replicated on every TP rank;
  * raw LM-head logits go through ``sampling.scale_logits`` (``/ logits_scaling / temperature``) exactly once, for
    sampling and for the vocab-parallel log-probs of ``score``; pad != eos;
  * audio LoRA: a checkpoint's audio adapter is always on when audio is present (every PromptBatch has audio), so
    it is MERGED into the base q/v weights at load (exact in fp32); LoRA training is not offered here.
Training: megatron DDP (+ distributed optimizer) over the data-parallel group, ``get_megatron_optimizer`` AdamW
with weight decay on every parameter (as torch AdamW in the HF backend), gradients averaged over DP.
Checkpoints: ``dist_checkpointing`` (torch_dist), loadable at another TP size. Export: a HF dir from any TP size.

Shape legend: B prompts, G samples/prompt, N = B*G, P prompt tokens, T completion tokens, V vocab, H hidden,
F' encoder frames, A audio tokens.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterable

import torch

from nemo_grpo.policy.base import Completions, PromptBatch, PromptContext
from nemo_grpo.policy.megatron import convert, cpu_shims, parallel
from nemo_grpo.policy.megatron import model as mm
from nemo_grpo.policy.sampling import sample_tokens, scale_logits
from nemo_grpo.policy.tokens import disable_dropout, resolve_pad, save_tokenizer

log = logging.getLogger(__name__)

# distributed-optimizer state in the canonical per-parameter layout, so a checkpoint reshards over TP and DP
_OPTIM_CKPT = {"distrib_optim_sharding_type": "fully_reshardable"}
BACKEND_OPTIONS = ("fp8", "fp8_recipe", "use_distributed_optimizer", "params_dtype")


class GraniteSpeechMegatron(torch.nn.Module):
    """Container so megatron DDP / the optimizer / checkpoints see one module: encoder, projector, llm."""

    def __init__(self, encoder: torch.nn.Module, projector: torch.nn.Module, llm: torch.nn.Module):
        super().__init__()
        self.encoder, self.projector, self.llm = encoder, projector, llm


def _merge_audio_lora(path: str, hf_llm: dict[str, torch.Tensor]) -> bool:
    """Fold a PEFT audio adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into the base weights:
    W += (lora_alpha / r) B A. Returns True when an adapter was merged."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_path):
        return False
    with open(cfg_path) as f:
        acfg = json.load(f)
    if acfg.get("use_dora") or acfg.get("use_rslora"):
        raise ValueError(f"{cfg_path}: DoRA / rsLoRA adapters are not supported by the megatron backend")
    scale = float(acfg["lora_alpha"]) / float(acfg["r"])
    from safetensors.torch import load_file

    adapter = load_file(os.path.join(path, "adapter_model.safetensors"))
    merged = 0
    for key, a in adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        base = convert.normalize_key(key[len("base_model.model."):].replace(".lora_A.weight", ".weight"))
        b = adapter[key.replace("lora_A", "lora_B")]
        if base not in hf_llm:
            raise ValueError(f"{path}: adapter targets {base}, which is not a language-model weight")
        # in fp32 at least: released weights are bf16 on disk, and rounding W + s B A to bf16 here would lose most
        # of the adapter's update (HF keeps the adapter as a separate path); params_dtype casts once, at the end
        w = hf_llm[base].to(torch.promote_types(hf_llm[base].dtype, torch.float32))
        hf_llm[base] = w + scale * (b.double() @ a.double()).to(w.dtype)
        merged += 1
    log.info("merged audio LoRA adapter (%d matrices, scale %.3g) into the base weights", merged, scale)
    return merged > 0


class MegatronGraniteSpeechPolicy:
    """See the module docstring. Build with :meth:`from_pretrained` (or ``build_policy`` from a model config)."""

    def __init__(self, model: GraniteSpeechMegatron, tokenizer, config, *, trainable: bool,
                 use_distributed_optimizer: bool = True, lora_merged: bool = False):
        self.module = model
        self.gpt = model.llm
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)
        if self.pad_token_id == self.eos_token_id:
            raise ValueError("tokenizer pad_token_id == eos_token_id: give the tokenizer a distinct pad token")
        text = config.text_config
        self.logits_scaling = float(text.logits_scaling)
        self.embedding_multiplier = float(text.embedding_multiplier)
        self.vocab_size = int(text.vocab_size)
        self.audio_token_id = int(config.audio_token_index)
        self.lora_merged = lora_merged
        self.use_distributed_optimizer = use_distributed_optimizer
        self.ddp = None
        self.optimizer = None
        self._max_grad_norm = 0.0
        if trainable and any(p.requires_grad for p in model.parameters()):
            self._wrap_ddp()
        self.eval()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, *, tensor_parallel_size: int = 1, sequence_parallel: bool = False,
                        params_dtype: torch.dtype = torch.float32, freeze_encoder: bool = True,
                        train_projector: bool = True, train_llm: bool = True, lora: dict | None = None,
                        fp8: str | None = None, fp8_recipe: str | None = None, trainable: bool = True,
                        use_distributed_optimizer: bool = True, seed: int = 0) -> "MegatronGraniteSpeechPolicy":
        """Load a local HF Granite Speech dir, convert the LLM to megatron and keep this TP rank's shard.

        Initialises torch.distributed (torchrun env or a world of 1) and megatron's TP x DP groups.
        Raises ValueError naming the model.* key for unsupported settings (LoRA training, trainable encoder,
        FP8 without Transformer Engine).
        """
        from transformers import AutoTokenizer, GraniteSpeechConfig
        from transformers.models.granite_speech import modeling_granite_speech as hf_gs

        if not os.path.isdir(path):
            raise ValueError(f"model.path {path!r} is not a directory (hub names are not supported offline)")
        if lora is not None:
            raise ValueError("model.lora: LoRA training is not supported by the megatron backend (full fine-tuning;"
                             " a checkpoint's audio adapter is merged at load)")
        if not freeze_encoder:
            raise ValueError("model.freeze_encoder=false is not supported by the megatron backend")
        parallel.init_model_parallel(tensor_parallel_size, seed=seed)
        config = GraniteSpeechConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        resolve_pad(tokenizer, config.text_config.vocab_size, reserved=(config.audio_token_index,))
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        state = convert.read_hf_state(path)
        with torch.device(device or "cpu"):  # random init is overwritten: do it where it is fast
            encoder = hf_gs.GraniteSpeechCTCEncoder(config.encoder_config)
            projector = hf_gs.GraniteSpeechEncoderProjector(config)
        for name, module in (("model.encoder.", encoder), ("model.projector.", projector)):
            sub = {k[len(name):]: v for k, v in state.items() if k.startswith(name)}
            module.load_state_dict(sub, strict=True)
        lora_merged = _merge_audio_lora(path, state)
        gpt = mm.build_gpt(config.text_config, tensor_parallel_size, sequence_parallel, params_dtype, fp8,
                           fp8_recipe)
        te = mm.have_te()
        full = convert.hf_to_megatron_full(state, config.text_config,
                                           mm.padded_vocab_size(config.text_config.vocab_size, tensor_parallel_size),
                                           te)
        convert.load_into_gpt(gpt, full)
        model = GraniteSpeechMegatron(encoder.to(params_dtype), projector.to(params_dtype), gpt)
        if device is not None:
            model.to(device)
        disable_dropout(model)  # dropout would make pi_old != pi_theta for the same weights (the RL ratio)
        for p in encoder.parameters():
            p.requires_grad_(False)
        for p in projector.parameters():
            p.requires_grad_(train_projector and trainable)
        for p in gpt.parameters():
            p.requires_grad_(train_llm and trainable)
        return cls(model, tokenizer, config, trainable=trainable,
                   use_distributed_optimizer=use_distributed_optimizer, lora_merged=lora_merged)

    def _wrap_ddp(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=self.use_distributed_optimizer)
        with cpu_shims.cuda_to_cpu():
            self.ddp = DistributedDataParallel(config=self.gpt.config, ddp_config=ddp_cfg, module=self.module)

    @property
    def device(self) -> torch.device:
        return self.gpt.embedding.word_embeddings.weight.device

    # ---------------------------------------------------------------- forward pieces
    def encode(self, batch: PromptBatch) -> PromptContext:
        """Encoder once per prompt: ctx.audio = encoder output [B, F', H_enc] (frozen: no grad)."""
        batch = batch.to(self.device)
        with torch.no_grad():
            enc = self.module.encoder(batch.input_features.to(self._dtype)).last_hidden_state
        return PromptContext(batch=batch, audio=enc)

    @property
    def _dtype(self) -> torch.dtype:
        return self.gpt.embedding.word_embeddings.weight.dtype

    def _prompt_embeds(self, ctx: PromptContext) -> torch.Tensor:
        """Projector once per prompt, spliced into the prompt's token embeddings: [B, P, H] (before Granite's
        embedding_multiplier), exactly HF's ``get_merged_audio_embeddings``."""
        ids = ctx.batch.input_ids
        is_audio = ids == self.audio_token_id  # [B, P]
        embeds = mm.text_embeddings(self.gpt, torch.where(is_audio, torch.zeros_like(ids), ids))
        audio = self.module.projector(ctx.audio)[ctx.batch.input_features_mask]  # [sum_b A_b, H]
        if int(is_audio.sum()) != audio.shape[0]:
            raise ValueError(f"prompts {ctx.batch.ids}: {int(is_audio.sum())} audio tokens but {audio.shape[0]} "
                             "projected audio embeddings")
        return embeds.masked_scatter(is_audio.unsqueeze(-1).expand_as(embeds), audio.to(embeds.dtype))

    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full-sequence raw logits [N, L, V_pad/TP] for embeds [N, L, H] with key mask [N, L] (right-padded to a
        multiple of TP under sequence parallelism; the extra positions are masked keys after every real one)."""
        n, length = mask.shape
        padded = mm.pad_to_tp(length, self.gpt.config.tensor_model_parallel_size, self.gpt.config.sequence_parallel)
        if padded != length:
            embeds = torch.cat([embeds, embeds.new_zeros(n, padded - length, embeds.shape[-1])], 1)
            mask = torch.cat([mask, mask.new_zeros(n, padded - length)], 1)
        dec = mm.merged_decoder_input(self.gpt, embeds, self.embedding_multiplier)
        return mm.lm_logits(self.gpt, dec, mm.attention_mask_4d(mask))[:, :length]

    # ---------------------------------------------------------------- Policy API
    def score(self, ctx: PromptContext, token_ids: torch.Tensor, group: torch.Tensor, temperature: float = 1.0,
              return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(token_ids[n, t] | prompt group[n], token_ids[n, :t]) [N, T] (+ entropy [N, T]), vocab-parallel,
        replicated on every TP rank; differentiable when grad is enabled. Values past eos are meaningless."""
        token_ids, group = token_ids.to(self.device), group.to(self.device)
        prompt = self._prompt_embeds(ctx)[group]  # [N, P, H]
        p, t = prompt.shape[1], token_ids.shape[1]
        embeds = torch.cat([prompt, mm.text_embeddings(self.gpt, token_ids)], 1)  # [N, P+T, H]
        mask = torch.cat([ctx.batch.attention_mask.bool()[group], torch.ones_like(token_ids, dtype=torch.bool)], 1)
        logits = self._forward(embeds, mask)[:, p - 1: p + t - 1]  # [N, T, V_pad/TP]: position p-1+t predicts t
        scaled = scale_logits(logits, self.logits_scaling, temperature)
        return mm.vocab_parallel_logprobs(scaled, token_ids, return_entropy)

    def generate(self, ctx: PromptContext, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Completions:
        """N = B*G samples in one KV-cache batch (megatron static inference context): prompts prefilled once per
        prompt, cache repeated G times. Every TP rank draws the same tokens (generator state synced from the TP
        source rank, identical gathered logits); checked at the end."""
        from megatron.core.inference.contexts import StaticInferenceContext

        gen = self._tp_synced_generator(generator)
        bsz, p = ctx.batch.input_ids.shape
        group = torch.arange(bsz, device=self.device).repeat_interleave(num_samples)  # [N]
        infer = StaticInferenceContext(max_batch_size=len(group), max_sequence_length=p + max_new_tokens)
        state: dict[str, torch.Tensor] = {}

        def prefill():
            mask = ctx.batch.attention_mask.bool()  # [B, P]
            dec = mm.merged_decoder_input(self.gpt, self._prompt_embeds(ctx), self.embedding_multiplier)
            logits = mm.lm_logits(self.gpt, dec, mm.attention_mask_4d(mask), inference_context=infer)
            infer.sequence_len_offset += p
            infer.swap_key_value_dict(group)  # rows 0..B-1 of the cache -> N rows, prompt-major
            state["mask"] = mask[group]
            return logits[:, -1, : self.vocab_size][group], infer

        def step(tokens, cache, t):
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], 1)
            emb = mm.text_embeddings(self.gpt, tokens.unsqueeze(1))  # [N, 1, H]
            dec = mm.merged_decoder_input(self.gpt, emb, self.embedding_multiplier)
            logits = mm.lm_logits(self.gpt, dec, mm.attention_mask_4d(state["mask"], query_len=1),
                                  inference_context=infer)
            infer.sequence_len_offset += 1
            return logits[:, -1, : self.vocab_size], cache

        with self._inference_mode():
            out = sample_tokens(prefill, step, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
                                pad_token_id=self.pad_token_id, logits_scaling=self.logits_scaling,
                                temperature=temperature, top_p=top_p, generator=gen)
        self._check_tp_consistent(out.token_ids)
        texts = [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(out.token_ids, out.mask)]
        return Completions(token_ids=out.token_ids, mask=out.mask, logprobs=out.logprobs, truncated=out.truncated,
                           group=group, texts=texts, off_policy=torch.zeros_like(out.truncated))

    @contextlib.contextmanager
    def _inference_mode(self):
        """Eval + no grad + sequence parallelism off (a 1-token decode step cannot be split over TP ranks).

        Like megatron's ``set_model_to_sequence_parallel`` but restoring each module's own flag (that helper
        would switch the embedding's scatter flags on, which this model builds off)."""
        was_training = self.gpt.training
        saved = [(m, m.sequence_parallel) for m in self.gpt.modules() if hasattr(m, "sequence_parallel")]
        sp = self.gpt.config.sequence_parallel
        self.gpt.eval()
        for m, _ in saved:
            m.sequence_parallel = False
        self.gpt.config.sequence_parallel = False
        try:
            with torch.no_grad():
                yield
        finally:
            for m, flag in saved:
                m.sequence_parallel = flag
            self.gpt.config.sequence_parallel = sp
            self.gpt.train(was_training)

    def _tp_synced_generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        """The TP source rank's generator state on every TP rank (a fresh seeded one when none is given)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return generator
        dev = self.device
        if generator is None:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        comm_dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        state = generator.get_state().to(torch.int64).to(comm_dev)
        dist.broadcast(state, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
        generator.set_state(state.to(torch.uint8).cpu())
        return generator

    def _check_tp_consistent(self, token_ids: torch.Tensor) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return
        lo, hi = token_ids.clone(), token_ids.clone()
        group = parallel_state.get_tensor_model_parallel_group()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            raise RuntimeError("tensor-parallel ranks sampled different tokens (non-deterministic logits?)")

    # ---------------------------------------------------------------- training side
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def data_parallel(self) -> tuple[int, int]:
        return parallel.dp_rank_size()

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                            max_grad_norm: float) -> None:
        """megatron AdamW (torch AdamW underneath without apex/TE), distributed over DP when configured."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if self.ddp is None:
            raise ValueError("no trainable parameters (model.train_projector/train_llm, or a frozen copy)")
        self._max_grad_norm = float(max_grad_norm)
        cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay,
                              adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps,
                              # clip at an unreachable norm when clipping is off, so the norm is still computed
                              clip_grad=self._max_grad_norm if self._max_grad_norm > 0 else 1e30,
                              bf16=self.gpt.config.bf16, params_dtype=self._dtype,
                              use_distributed_optimizer=self.use_distributed_optimizer)
        with cpu_shims.cuda_to_cpu():
            # config_overrides={}: weight decay on every parameter, as torch AdamW in the HF backend
            self.optimizer = get_megatron_optimizer(cfg, [self.ddp], config_overrides={})

    def finalize_grads(self, all_reduce: bool = False) -> None:
        """DP average (DDP buffers) + TP sum of sequence-parallel norm grads; ``optimizer_step`` calls it.

        With the distributed optimizer each DP rank then holds only its shard of the reduced gradient;
        ``all_reduce=True`` makes every rank hold all of it (to inspect gradients, e.g. ``full_grads_hf``)."""
        from megatron.core.distributed import finalize_model_grads

        with cpu_shims.cuda_to_cpu():
            finalize_model_grads([self.ddp], force_all_reduce=all_reduce)

    def zero_grads(self) -> None:
        """Drop accumulated gradients without stepping."""
        self.ddp.zero_grad_buffer()
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def optimizer_step(self, lr: float) -> float:
        """Reduce grads over DP, clip to max_grad_norm, AdamW step at ``lr``, zero grads; returns the norm."""
        if self.optimizer is None:
            raise ValueError("optimizer_step before configure_optimizer")
        self.finalize_grads()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with cpu_shims.cuda_to_cpu():
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron optimizer step failed (non-finite gradients)")
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        return float(grad_norm)

    def full_grads_hf(self) -> dict[str, torch.Tensor]:
        """HF-named full gradients (TP gathered) of the trainable LLM + projector, for equivalence tests; call
        ``finalize_grads(all_reduce=True)`` first."""
        grads = {}
        for name, p in self.gpt.named_parameters():
            if p.requires_grad:
                g = getattr(p, "main_grad", None)
                grads[name] = (g if g is not None else p.grad).detach().clone()
        hf = convert.megatron_full_to_hf(_gather_named(grads), self.config.text_config, mm.have_te())
        for name, p in self.module.projector.named_parameters():
            if p.requires_grad:
                g = getattr(p, "main_grad", None)
                hf["model.projector." + name] = (g if g is not None else p.grad).detach().clone()
        return hf

    # ---------------------------------------------------------------- checkpoints / export
    def _model_sharded_state_dict(self) -> dict:
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = self.gpt.sharded_state_dict(prefix="llm.")
        # replicated over TP and DP: one writer (replica id 0) among all ranks
        sd.update(sharded_state_dict_default(self.module.projector, prefix="projector.",
                                             tp_group=parallel_state.get_tensor_model_parallel_group()))
        return sd

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """torch_dist checkpoint of the LLM shards + projector (+ optimizer); collective over all ranks."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
        dist.barrier()
        model_sd = self._model_sharded_state_dict()
        state = {"model": model_sd}
        with cpu_shims.cuda_to_cpu():
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_CKPT)
            dist_checkpointing.save(state, ckpt_dir)
        dist.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Inverse of ``save_checkpoint``, at this run's TP size (which may differ from the saving run's)."""
        from megatron.core import dist_checkpointing

        if not os.path.isdir(ckpt_dir):
            raise ValueError(f"{ckpt_dir}: not a checkpoint directory")
        model_sd = self._model_sharded_state_dict()
        state = {"model": model_sd}
        with cpu_shims.cuda_to_cpu():
            if self.optimizer is not None:
                self._init_optimizer_state()
                state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                       metadata=_OPTIM_CKPT)
            loaded = dist_checkpointing.load(state, ckpt_dir)
        model = loaded["model"]
        self.gpt.load_state_dict({k[4:]: v for k, v in model.items() if k.startswith("llm.")}, strict=False)
        self.module.projector.load_state_dict(
            {k[len("projector."):]: v for k, v in model.items() if k.startswith("projector.")})
        if self.optimizer is not None:
            with cpu_shims.cuda_to_cpu(), _adam_state_load_fixes(self.optimizer):
                self.optimizer.load_state_dict(loaded["optimizer"])

    def _init_optimizer_state(self) -> None:
        """Zero Adam moments + step for every parameter not stepped yet (the load template). megatron-core 0.16's
        own init_state_fn omits torch Adam's ``step``, which its DistributedOptimizer.state_dict then requires
        (the no-apex/no-TE path)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    st = inner.state[p]
                    if not st:
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                        st["step"] = torch.tensor(0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named full weights (LLM gathered over TP, projector, encoder): a TP-independent view."""
        out = convert.megatron_full_to_hf(convert.gather_full_state(self.gpt), self.config.text_config,
                                          mm.have_te())
        for prefix, module in (("model.projector.", self.module.projector), ("model.encoder.", self.module.encoder)):
            out.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict` (HF names), sharded for this TP rank."""
        tp = self.gpt.config.tensor_model_parallel_size
        full = convert.hf_to_megatron_full(state, self.config.text_config,
                                           mm.padded_vocab_size(self.vocab_size, tp), mm.have_te())
        convert.load_into_gpt(self.gpt, full)
        for prefix, module in (("model.projector.", self.module.projector), ("model.encoder.", self.module.encoder)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save_pretrained(self, out_dir: str) -> None:
        """A HF Granite Speech dir (config, safetensors, tokenizer) from any TP size; collective, rank 0 writes.
        A merged audio adapter stays merged (``has_lora_adapter`` false)."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        state = self.state_dict()
        if dist.get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            tensors = {convert.to_legacy_key(k): v.detach().to("cpu").contiguous() for k, v in state.items()}
            save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            config = type(self.config).from_dict(self.config.to_dict())
            if self.lora_merged:
                config.has_lora_adapter = False
            config.save_pretrained(out_dir)
            save_tokenizer(self.tokenizer, out_dir)
        dist.barrier()

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "MegatronGraniteSpeechPolicy":
        self.module.train(mode)
        self.module.encoder.eval()  # frozen: BatchNorm statistics never move
        return self

    def eval(self) -> "MegatronGraniteSpeechPolicy":
        return self.train(False)


@contextlib.contextmanager
def _adam_state_load_fixes(optimizer):
    """Two megatron-core 0.16 bugs on the no-apex/no-TE path (CPU, or a GPU box without them), around
    DistributedOptimizer.load_state_dict:

    1. it puts torch Adam's ``step`` into every param state, then copies each param's checkpointed tensors over
       ``{param, **state}`` and fails on ``step``, which fully_reshardable checkpoints do not store per param: feed
       the already-restored step back as its own source (a no-op copy) during the load;
    2. that ``step`` is ONE tensor shared by all params, which torch AdamW then increments in place once per param
       per step (wrong bias correction from the second step on): give every param its own copy after the load."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    patched = []
    if not dopt.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if not isinstance(opt, dopt.DistributedOptimizer):
                continue
            orig = opt._set_main_param_and_optimizer_states

            def with_step(model_param, tensors, opt=opt, orig=orig):
                if "step" not in tensors:
                    gi, go = opt.model_param_group_index_map[model_param]
                    state = opt.optimizer.state[opt.optimizer.param_groups[gi]["params"][go]]
                    if "step" in state:
                        tensors = {**tensors, "step": state["step"]}
                return orig(model_param, tensors)

            opt._set_main_param_and_optimizer_states = with_step
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


def _gather_named(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TP=1 view of megatron-named shards (collective over the TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return tensors
    out = {}
    for name, t in tensors.items():
        if convert.is_tp_sharded(name):
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            t = convert.unshard(name, parts)
        out[name] = t
    return out


def build_policy(model_cfg: Any, *, device: torch.device | None = None, trainable: bool = True, seed: int = 0
                 ) -> MegatronGraniteSpeechPolicy:
    """``nemo_grpo.train.runtime`` factory entry: ``model.backend: megatron``.

    Reads model.path, tensor_parallel_size, sequence_parallel, freeze_encoder, train_projector, train_llm, lora,
    precision and ``model.backend_options`` (``fp8``, ``fp8_recipe``, ``use_distributed_optimizer``,
    ``params_dtype``: "fp32"/"bf16"). The device is this rank's CUDA device when there is one, else CPU.
    """
    opts = dict(model_cfg.backend_options or {})
    unknown = sorted(set(opts) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"model.backend_options: unknown key(s) {unknown}; known {list(BACKEND_OPTIONS)}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if opts.get("params_dtype", "fp32") not in dtypes:
        raise ValueError(f"model.backend_options.params_dtype={opts['params_dtype']!r}; choose from {list(dtypes)}")
    return MegatronGraniteSpeechPolicy.from_pretrained(
        model_cfg.path, tensor_parallel_size=int(model_cfg.tensor_parallel_size),
        sequence_parallel=bool(model_cfg.sequence_parallel),
        params_dtype=dtypes[opts.get("params_dtype", "fp32")],
        freeze_encoder=model_cfg.freeze_encoder, train_projector=model_cfg.train_projector,
        train_llm=model_cfg.train_llm, lora=model_cfg.lora if trainable else None,
        fp8=opts.get("fp8"), fp8_recipe=opts.get("fp8_recipe"), trainable=trainable,
        use_distributed_optimizer=bool(opts.get("use_distributed_optimizer", True)), seed=seed)
