"""rlhf_jax: RLHF as pure, jitted functions of explicit pytrees.

One iteration is `collect` (= `rollout` -> critic values -> `score`) then `ppo_update`; the
config dataclasses say everything each of them reads.
"""

from rlhf_jax import policy_losses  # noqa: F401  (registers gspo, dr_grpo, dapo, cispo, ...)
from rlhf_jax import preference_losses  # noqa: F401  (registers dpo, ipo, simpo, orpo, kto, ...)
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.collect import collect
from rlhf_jax.kl import KLConfig
from rlhf_jax.losses import PolicyLossConfig, ValueLossConfig
from rlhf_jax.optim import OptimConfig
from rlhf_jax.ppo import Minibatch, PPOConfig, TrainState, init_train_state, ppo_update
from rlhf_jax.rollout import Rollout, SamplingConfig, rollout
from rlhf_jax.score import RewardNorm, Scored, score

__all__ = [
    "AdvantageConfig", "KLConfig", "Minibatch", "OptimConfig", "PPOConfig", "PolicyLossConfig",
    "Rollout", "RewardNorm", "SamplingConfig", "Scored", "TrainState", "ValueLossConfig",
    "collect", "init_train_state", "ppo_update", "rollout", "score",
]
