"""Advantage estimators for batched, padded completions.

All estimators take `AdvantageInputs` with arrays of shape [B, T] (B completions, T completion
tokens, mask 1 = valid token) and return `(advantages, returns)`, both [B, T] float32 and zero at
masked positions. `returns` is the regression target of a value function where there is one.

Group-relative estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) assume rows are grouped
consecutively: rows [g*G:(g+1)*G] are the G = `group_size` completions of prompt g. ReMax instead
reads a per-row baseline return (`AdvantageInputs.baselines`, the greedy completion's).

Whitening of advantages for PPO is left to the caller (`rlhf_jax.masked.masked_whiten`), so it can
happen over the whole batch or per minibatch.

A fork adds an estimator by name:

  @register_advantage_estimator("my_estimator")
  def my_estimator(cfg: AdvantageConfig, inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
    ...  # must return zeros at masked positions
"""

import dataclasses
from collections.abc import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.masked import last_valid_mask, masked_sum, masked_whiten
from rlhf_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """Which advantage estimator to use and its hyperparameters.

  Attributes:
    estimator: Key of `ADVANTAGE_ESTIMATORS`.
    gamma: Discount per token (gae, reinforce, reinforce_pp_baseline; grpo/rloo use undiscounted
      sequence returns).
    lam: GAE lambda.
    eps: Added to the group std in grpo.
  """

  estimator: str = "gae"
  gamma: float = 1.0
  lam: float = 0.95
  eps: float = 1e-6

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0:
      raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
    if not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"lam must be in [0, 1], got {self.lam}")
    if self.eps < 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}")


@flax.struct.dataclass
class AdvantageInputs:
  """What an advantage estimator sees.

  Attributes:
    token_rewards: Reward per completion token [B, T] float32 (e.g. score at the last token minus
      beta * KL per token).
    values: Value estimates V(s_t) [B, T] float32, or None for estimators without a critic.
    mask: [B, T] float32 or bool, 1 = valid completion token.
    group_size: Completions per prompt G (static), a property of the batch's layout: rows
      [g*G:(g+1)*G] are the completions of prompt g. Must divide B.
    baselines: Optional [B] float32 baseline return b_i per row, computed like R_i = sum_t r_t
      (same reward, same shaping) on another completion of row i's prompt; "remax" needs it
      (the greedy completion's return), the other estimators ignore it.
  """

  token_rewards: jax.Array
  values: jax.Array | None
  mask: jax.Array
  group_size: int = flax.struct.field(pytree_node=False, default=1)
  baselines: jax.Array | None = None


AdvantageEstimator = Callable[[AdvantageConfig, AdvantageInputs], tuple[jax.Array, jax.Array]]

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
  """Decorator registering `fn(cfg, inputs) -> (advantages, returns)` under `name`."""
  return ADVANTAGE_ESTIMATORS.register(name)


def generalized_advantage_estimation(rewards: jax.Array, values: jax.Array, mask: jax.Array,
                                     gamma: float | jax.Array,
                                     lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """GAE(gamma, lambda) as a reverse `lax.scan` over time.

  Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (arXiv:1506.02438):
    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    R_t     = A_t + V_t

  V and A beyond the last valid token are 0 (the episode ends there). Masked inputs are ignored
  (a masked position also cuts the bootstrap of the token before it).

  Args:
    rewards: [B, T] per-token rewards.
    values: [B, T] value estimates.
    mask: [B, T], 1 = valid token.
    gamma: Discount.
    lam: GAE lambda.

  Returns:
    (advantages, returns), [B, T] float32, zero where mask is 0.
  """
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  valid = mask.astype(bool)
  r = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
  v = jnp.where(valid, values.astype(jnp.float32), 0.0)

  def step(carry, xs):
    # Carried values are already 0 at masked positions, which implements the m_{t+1} factors.
    next_adv, next_value = carry
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_value - v_t
    adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0.0)
    return (adv, v_t), adv

  zeros = jnp.zeros(r.shape[0], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
  adv = adv_tb.T
  return adv, adv + v


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float | jax.Array) -> jax.Array:
  """Returns-to-go G_t = r_t + gamma * m_{t+1} * G_{t+1}, zero where mask is 0.

  This is GAE with V = 0 and lambda = 1 (Schulman et al. 2016, eq. 17), so it shares that scan.
  """
  return generalized_advantage_estimation(rewards, jnp.zeros_like(rewards), mask, gamma, 1.0)[0]


def _check_groups(group_size: int, batch_size: int, estimator: str, min_size: int) -> None:
  if group_size < min_size:
    raise ValueError(
        f"advantage estimator {estimator!r} needs group_size >= {min_size} completions per prompt, "
        f"got {group_size}")
  if batch_size % group_size:
    raise ValueError(
        f"group_size {group_size} must divide the batch size {batch_size}: rows "
        f"[g*{group_size}:(g+1)*{group_size}] are the completions of prompt g")


def _grouped_returns(cfg: AdvantageConfig, inputs: AdvantageInputs) -> jax.Array:
  """Undiscounted sequence returns R_i = sum_t m_t r_t, reshaped [B / G, G]."""
  batch_size = inputs.token_rewards.shape[0]
  _check_groups(inputs.group_size, batch_size, cfg.estimator, min_size=2)
  returns = masked_sum(inputs.token_rewards, inputs.mask, axis=1)
  return returns.reshape(batch_size // inputs.group_size, inputs.group_size)


def _broadcast_to_tokens(per_sequence: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask.astype(bool), per_sequence.reshape(-1, 1), 0.0)


@register_advantage_estimator("gae")
def gae_estimator(cfg: AdvantageConfig, inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """GAE with the critic's values; see `generalized_advantage_estimation`."""
  if inputs.values is None:
    raise ValueError("advantage estimator 'gae' needs AdvantageInputs.values (a critic)")
  return generalized_advantage_estimation(inputs.token_rewards, inputs.values, inputs.mask,
                                          cfg.gamma, cfg.lam)


@register_advantage_estimator("grpo")
def grpo_estimator(cfg: AdvantageConfig, inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """Group-relative advantage of GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, 4.1.2).

  A_i = (R_i - mean_group(R)) / (std_group(R) + eps) for every valid token of completion i, with
  R_i the sequence return. The std is the unbiased one (ddof = 1), as torch.std in the reference
  implementations (TRL, OpenRLHF, verl). returns = advantages.
  """
  returns = _grouped_returns(cfg, inputs)
  mean = jnp.mean(returns, axis=1, keepdims=True)
  std = jnp.std(returns, axis=1, ddof=1, keepdims=True)
  adv = _broadcast_to_tokens((returns - mean) / (std + cfg.eps), inputs.mask)
  return adv, adv


@register_advantage_estimator("dr_grpo")
def dr_grpo_estimator(cfg: AdvantageConfig,
                      inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training",
  arXiv:2503.20783): GRPO's without the std division, which up-weights prompts whose rewards vary
  little (too easy or too hard ones).

  A_i = R_i - mean_group(R) for every valid token of completion i. returns = advantages.
  """
  returns = _grouped_returns(cfg, inputs)
  adv = _broadcast_to_tokens(returns - jnp.mean(returns, axis=1, keepdims=True), inputs.mask)
  return adv, adv


@register_advantage_estimator("remax")
def remax_estimator(cfg: AdvantageConfig,
                    inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """ReMax (Li et al. 2023, arXiv:2310.10505): REINFORCE with the greedy completion's reward as
  the baseline.

  A_i = R_i - b_i for every valid token of completion i, with R_i the undiscounted sequence return
  and b_i = `inputs.baselines[i]` the return of the greedy completion of the same prompt (the
  caller decodes and scores it; it is not a row of the batch). returns = advantages.
  """
  if inputs.baselines is None:
    raise ValueError(f"advantage estimator {cfg.estimator!r} needs AdvantageInputs.baselines (the "
                     "greedy completion's return for each row's prompt)")
  returns = masked_sum(inputs.token_rewards, inputs.mask, axis=1)
  adv = _broadcast_to_tokens(returns - inputs.baselines.astype(jnp.float32), inputs.mask)
  return adv, adv


@register_advantage_estimator("rloo")
def rloo_estimator(cfg: AdvantageConfig, inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740).

  A_i = R_i - 1/(G-1) sum_{j != i} R_j for every valid token of completion i. returns = advantages.
  """
  returns = _grouped_returns(cfg, inputs)
  baseline = (jnp.sum(returns, axis=1, keepdims=True) - returns) / (inputs.group_size - 1)
  adv = _broadcast_to_tokens(returns - baseline, inputs.mask)
  return adv, adv


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_estimator(cfg: AdvantageConfig,
                                    inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """REINFORCE++ with a group-mean baseline.

  Hu et al. 2025, "REINFORCE++" (arXiv:2501.03262); OpenRLHF's `reinforce_baseline`:
  r'_t = r_t - mean_group(R) at the last valid token (r_t elsewhere); G_t = returns-to-go of r'
  with `gamma`; advantages = G whitened over all valid tokens of the batch, returns = G.
  """
  grouped = _grouped_returns(cfg, inputs)
  group_mean = jnp.mean(grouped, axis=1, keepdims=True)
  baseline = jnp.broadcast_to(group_mean, grouped.shape).reshape(-1, 1)
  rewards = inputs.token_rewards.astype(jnp.float32)
  rewards = jnp.where(last_valid_mask(inputs.mask), rewards - baseline, rewards)
  returns = discounted_returns(rewards, inputs.mask, cfg.gamma)
  return masked_whiten(returns, inputs.mask), returns


@register_advantage_estimator("reinforce")
def reinforce_estimator(cfg: AdvantageConfig,
                        inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """Plain REINFORCE (Williams 1992): returns-to-go with `gamma`, no baseline; adv = returns."""
  returns = discounted_returns(inputs.token_rewards, inputs.mask, cfg.gamma)
  return returns, returns


def compute_advantages(cfg: AdvantageConfig,
                       inputs: AdvantageInputs) -> tuple[jax.Array, jax.Array]:
  """Runs the estimator named `cfg.estimator`.

  Args:
    cfg: Static config (hashable; pass as a static argument under jit).
    inputs: Rewards, optional values and mask, [B, T]; optional baselines, [B].

  Returns:
    (advantages, returns), [B, T] float32, zero at masked positions.

  Raises:
    ValueError: if `inputs.group_size` does not divide B, or the estimator lacks what it needs.
    UnknownNameError: if the estimator is not registered.
  """
  chex.assert_rank([inputs.token_rewards, inputs.mask], 2)
  chex.assert_equal_shape([inputs.token_rewards, inputs.mask])
  if inputs.values is not None:
    chex.assert_equal_shape([inputs.token_rewards, inputs.values])
  if inputs.baselines is not None:
    chex.assert_shape(inputs.baselines, inputs.token_rewards.shape[:1])
  estimator = ADVANTAGE_ESTIMATORS.get(cfg.estimator)
  if inputs.group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {inputs.group_size}")
  _check_groups(inputs.group_size, inputs.token_rewards.shape[0], cfg.estimator, min_size=1)
  advantages, returns = estimator(cfg, inputs)
  chex.assert_equal_shape([advantages, returns, inputs.mask])
  chex.assert_type([advantages, returns], jnp.float32)
  return advantages, returns
