"""`PPOTrainerConfig`: the RL loop's settings around the algorithm's (`ppo.PPOConfig`)."""

import dataclasses
import math

import jax.numpy as jnp

from rlhf_jax import dynamic_sampling as ds_lib
from rlhf_jax import ppo as ppo_lib
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rewards import RewardsConfig


@dataclasses.dataclass(frozen=True)
class PPOTrainerConfig(ppo_lib.PPOConfig):
  """The RL loop: the algorithm's fields (`PPOConfig`: sampling, losses, estimator, KL, critic,
  epochs, minibatches) and

  Attributes:
    batch_size: Prompts per iteration (global, over all processes); each is sampled
      `group_size` times.
    max_prompt_len: Prompts are left-padded / left-truncated to this many tokens.
    max_steps: Iteration budget.
    reward_threshold: Stop once the evaluated mean reward-model score (raw units) reaches this.
    stop_on_hacking: Stop at the first evaluation where the reward-hacking monitor fires
      (`evaluation.reward_hacking`); the last checkpoint is then the policy it judged.
    eval_every: Iterations between evaluations on held-out prompts (0: only at the end).
    num_eval_prompts: Held-out prompts per evaluation.
    num_samples_logged: Rows of the sample table written per evaluation.
    normalize_reward: Calibrate gain/bias so the initial policy's scores have mean 0, std 1.
    seed: Seeds sampling, shuffling and minibatching.
    log_every_s: Progress line period.
    checkpoint_every: Iterations between checkpoints (with a checkpoint directory; 0: only the
      final one and on preemption).
    keep_checkpoints: Newest checkpoints kept.
    max_nonfinite_iterations: Stop after this many consecutive iterations with a non-finite
      reward or skipped non-finite minibatch steps.
    frozen_param_dtype: Store the frozen reference and reward weights in this dtype (e.g.
      "bfloat16": half their memory; they compute in the models' compute dtype either way);
      None: as loaded. The trained policy and critic keep their master dtype.
    optim: Optimizer of policy and critic; its total_steps counts minibatch steps and defaults
      to the run's (max_steps x ppo_epochs x num_minibatches).
    rewards: What the policy is rewarded with: the reward model, registered rule / text
      rewards, or a weighted sum (`rlhf_jax.rewards`; the pipeline builds the reward_fn from it).
    lora: LoRA adapters on the policy and a separate critic (rank 0: full fine-tuning). Only
      the adapters (and the critic's head) are trained and checkpointed; the reference is the
      policy with its adapters off, so the policy's weights exist once; `frozen_param_dtype`
      then applies to the frozen base too.
    dynamic_sampling: DAPO's refill of the batch with groups whose rewards differ
      (`rlhf_jax.dynamic_sampling`; needs group_size > 1).
  """
  batch_size: int = 64
  max_prompt_len: int = 16
  max_steps: int = 20_000
  reward_threshold: float | None = None
  stop_on_hacking: bool = False
  eval_every: int = 10
  num_eval_prompts: int = 64
  num_samples_logged: int = 8
  normalize_reward: bool = True
  seed: int = 0
  log_every_s: float = 10.0
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  max_nonfinite_iterations: int = 3
  frozen_param_dtype: str | None = None
  optim: OptimConfig = OptimConfig()
  rewards: RewardsConfig = RewardsConfig()
  lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig()
  dynamic_sampling: ds_lib.DynamicSamplingConfig = ds_lib.DynamicSamplingConfig()

  def __post_init__(self):
    super().__post_init__()
    if self.dynamic_sampling.enabled and self.group_size < 2:
      raise ValueError("dynamic_sampling compares the rewards within a group: it needs "
                       f"group_size > 1, got {self.group_size}")
    for name in ("batch_size", "max_prompt_len", "max_steps", "num_eval_prompts",
                 "keep_checkpoints", "max_nonfinite_iterations"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "num_samples_logged", "checkpoint_every", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not self.log_every_s >= 0:
      raise ValueError(f"log_every_s must be >= 0, got {self.log_every_s}")
    if self.reward_threshold is not None:
      if not math.isfinite(self.reward_threshold):
        raise ValueError(f"reward_threshold must be finite or unset, got {self.reward_threshold}")
      if not self.eval_every:   # evaluation only after the last step could never stop early
        raise ValueError("reward_threshold is checked at evaluations: it needs eval_every > 0")
    if self.frozen_param_dtype is not None:
      try:
        jnp.dtype(self.frozen_param_dtype)
      except TypeError:
        raise ValueError(f"frozen_param_dtype {self.frozen_param_dtype!r} is not a dtype") from None
    if (self.batch_size * self.group_size) % self.num_minibatches:
      raise ValueError(f"batch_size*group_size={self.batch_size * self.group_size} is not "
                       f"divisible by num_minibatches={self.num_minibatches}")
    minibatch = self.batch_size * self.group_size // self.num_minibatches
    if self.micro_batch_size is not None and minibatch % self.micro_batch_size:
      raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide the minibatch "
                       f"size {minibatch} (batch_size*group_size / num_minibatches)")

  @property
  def algorithm(self) -> ppo_lib.PPOConfig:
    """The PPOConfig part: the static argument of the jitted programs, so the loop's budget and
    cadence fields never cause a recompilation."""
    return ppo_lib.PPOConfig(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(ppo_lib.PPOConfig)})

  @property
  def optimizer(self) -> OptimConfig:
    """`optim` with total_steps defaulted to the run's minibatch steps."""
    if self.optim.total_steps is not None:
      return self.optim
    return dataclasses.replace(
        self.optim, total_steps=self.max_steps * self.ppo_epochs * self.num_minibatches)
