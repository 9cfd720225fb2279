"""Rewards for GRPO: plain ``(hyps, refs, **options) -> list[float]`` functions in [0, 1] and their weighted mix.

Registered names: bleu, chrf, rouge1, rouge2, rougeL, meteor, bertscore (or a dotted path ``"pkg.mod:fn"``).
``build_reward(spec)`` turns a YAML spec into a :class:`RewardFunction`; see :mod:`nemo_grpo.rewards.combine`.
"""
from nemo_grpo.rewards.neural import bertscore, minilm_model_path
from nemo_grpo.rewards.combine import (
    EXPENSIVE,
    REWARDS,
    RewardComponent,
    RewardFunction,
    RewardResult,
    build_reward,
    register_reward,
    resolve_reward,
)
from nemo_grpo.rewards.lexical import bleu, chrf, rouge, rouge1, rouge2, rougeL, rouge_tokenizer
from nemo_grpo.rewards.meteor_offline import ensure_wordnet, meteor

__all__ = [
    "EXPENSIVE", "REWARDS", "RewardComponent", "RewardFunction", "RewardResult", "bertscore", "bleu",
    "build_reward", "chrf", "ensure_wordnet", "meteor", "minilm_model_path", "register_reward", "resolve_reward",
    "rouge", "rouge1", "rouge2", "rougeL", "rouge_tokenizer",
]
