"""The policy interface every backend (HF ``hf.py``, megatron-core ``megatron/``) implements.

Shape legend: B prompts, G samples per prompt, N = B*G completions, P prompt tokens, T completion tokens,
F feature frames (50 Hz, 160-dim stacked log-mel), A projected audio tokens (10 per second), H hidden size.

Contract (the GRPO/SFT recipes rely on nothing else):

1. ``encode(batch)`` runs the (frozen) speech encoder ONCE per prompt and returns a ``PromptContext``.
   Everything that needs the audio afterwards (sampling all G completions, the old/reference/current scoring
   passes of every policy update) reuses that context; the projector runs once per prompt per forward, never per
   sample.
2. ``generate(ctx, ...)`` samples completions with a KV cache and returns their log-probs as computed at sampling
   time (temperature applied) so they can serve as log pi_old.
3. ``score(ctx, token_ids, group, ...)`` returns per-token log-probs (differentiable when grad is enabled) of given
   completions, through the same logits path as sampling (``logits / logits_scaling / temperature`` exactly once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

import torch


@dataclass
class PromptBatch:
    """B prompts with their audio, as produced by the dataset (``nemo_grpo.data``).

    input_ids:        [B, P] long, LEFT-padded with pad_token_id; the audio placeholder ``<|audio|>`` is already
                      expanded to as many tokens as the prompt's audio yields (A_b <= A).
    attention_mask:   [B, P] long/bool, 1 = real token.
    input_features:   [B, F, 160] float, stacked log-mel features (zero-padded in F).
    input_features_mask: [B, A] bool, True where projected audio token a of prompt b is real (HF's name/semantics).
    references:       B reference texts (answers / translations).
    ids:              B utterance/cut ids (for logs, skips and sample dumps).
    prompts:          B rendered prompt texts (for logs).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    input_features: torch.Tensor
    input_features_mask: torch.Tensor
    references: list[str]
    ids: list[str]
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.input_features.to(device),
            self.input_features_mask.to(device),
            self.references,
            self.ids,
            self.prompts,
        )


@dataclass
class PromptContext:
    """What ``Policy.encode`` returns: per-prompt state reused by every later pass. Backend-specific payload.

    batch:  the PromptBatch it was built from (B prompts).
    audio:  backend-defined cached audio state, e.g. encoder outputs [B, F', H_enc] (no grad when frozen).
    """

    batch: PromptBatch
    audio: Any


@dataclass
class Completions:
    """N = B*G completions, ordered prompt-major (completion n belongs to prompt ``group[n]``).

    token_ids:  [N, T] long; positions after end-of-text hold pad_token_id (pad != eos, so eos is learned).
    mask:       [N, T] bool, True = the token counts (includes the eos token itself; excludes padding).
    logprobs:   [N, T] float, log pi_sample(token) at sampling time, temperature applied; 0 where mask is False.
                For an off-policy member (mixed-policy) this is 0 (pi_phi = 1 convention).
    truncated:  [N] bool, True when no eos was produced within max_new_tokens.
    group:      [N] long, the prompt index b of each completion.
    texts:      N decoded texts (special tokens stripped).
    off_policy: [N] bool, True for injected reference answers (never generated, only scored).
    """

    token_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    group: torch.Tensor
    texts: list[str]
    off_policy: torch.Tensor

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "Completions":
        """The completions at ``rows`` [K] (long indices), in that order; ``group`` values are kept."""
        idx = rows.tolist()
        return Completions(self.token_ids[rows], self.mask[rows], self.logprobs[rows], self.truncated[rows],
                           self.group[rows], [self.texts[i] for i in idx], self.off_policy[rows])


@runtime_checkable
class Policy(Protocol):
    """A speech-aware LM policy. See the module docstring for the contract."""

    tokenizer: Any
    eos_token_id: int
    pad_token_id: int

    def encode(self, batch: PromptBatch) -> PromptContext:
        """Run the speech encoder once per prompt (no grad when it is frozen)."""
        ...

    def generate(
        self,
        ctx: PromptContext,
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Completions:
        """Sample ``num_samples`` completions per prompt (N = B * num_samples) with a KV cache."""
        ...

    def score(
        self,
        ctx: PromptContext,
        token_ids: torch.Tensor,
        group: torch.Tensor,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs [N, T] of ``token_ids`` [N, T] given prompt ``group`` [N]; optional entropy [N, T]."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        ...

    # --- training side: the policy owns its model AND optimizer, so recipes never branch on the backend ---------
    # (megatron wraps its model in its DDP and uses its distributed optimizer; HF uses torch AdamW + all-reduce).

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process in the data-parallel group; (0, 1) when not distributed."""
        ...

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, max_grad_norm: float
    ) -> None:
        """Create the AdamW optimizer over ``trainable_parameters()``."""
        ...

    def optimizer_step(self, lr: float) -> float:
        """Reduce gradients over data-parallel ranks, clip to max_grad_norm, step at ``lr``, zero grads.

        Returns the global gradient norm before clipping."""
        ...

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Write model + optimizer state into ``ckpt_dir`` (collective under distributed; caller makes it atomic)."""
        ...

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Inverse of ``save_checkpoint`` (model + optimizer)."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Train mode for the trainable parts; a frozen encoder stays in eval (BatchNorm statistics)."""
        ...

    def eval(self) -> Any:
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any:
        ...

    def save_pretrained(self, out_dir: str) -> None:
        """Write a HF Granite Speech dir that ``GraniteSpeechForConditionalGeneration.from_pretrained`` loads."""
        ...
