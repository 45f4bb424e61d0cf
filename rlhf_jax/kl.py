"""KL penalty between the policy and the reference model, and its coefficient controller.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html): with samples from the policy and log r = ref_logp - logp,
  k1 = -log r            unbiased, high variance, can be negative per token;
  k2 = (log r)^2 / 2     biased, low variance, >= 0;
  k3 = (r - 1) - log r   unbiased, low variance, >= 0.
Controllers follow Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(arXiv:1909.08593), section 2.2: a fixed coefficient, or a proportional controller steering the
observed KL towards a target.

New estimators / controllers are added by name:

  @KL_ESTIMATORS.register("my_kl")
  def my_kl(logprobs, ref_logprobs): ...
"""

import dataclasses
from collections.abc import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.registry import Registry

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def _log_ratio(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """logp - ref_logp in float32."""
  chex.assert_rank(logprobs, 2)
  chex.assert_equal_shape([logprobs, ref_logprobs])
  return logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k1 = logp - ref_logp (Schulman 2020)."""
  return _log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k2 = (logp - ref_logp)^2 / 2 (Schulman 2020)."""
  return 0.5 * jnp.square(_log_ratio(logprobs, ref_logprobs))


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (Schulman 2020)."""
  log_r = -_log_ratio(logprobs, ref_logprobs)
  # expm1 keeps precision when r is close to 1, which is the usual regime.
  return jnp.expm1(log_r) - log_r


@KL_ESTIMATORS.register("abs")
def kl_abs(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """|logp - ref_logp| (the "abs" penalty of TRL / OpenRLHF)."""
  return jnp.abs(_log_ratio(logprobs, ref_logprobs))


def kl_penalty(name: str, logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Per-token KL estimate [B, T] of the estimator registered as `name`.

  The result is NOT masked: padded positions hold whatever the estimator makes of the pad
  log-probabilities (possibly inf / NaN for k3). Callers must select valid tokens with
  `jnp.where(mask, kl, 0.0)` (not `kl * mask`, since inf * 0 = NaN) or reduce with
  `rlhf_jax.masked.masked_mean(kl, mask)`.

  Args:
    name: A key of `KL_ESTIMATORS` ("k1", "k2", "k3", "abs", or a registered extension).
    logprobs: log pi(a_t | s_t) of the sampled tokens under the policy, [B, T].
    ref_logprobs: The same under the reference model, [B, T].
  """
  return KL_ESTIMATORS.get(name)(logprobs, ref_logprobs)


@flax.struct.dataclass
class KLControllerState:
  """Mutable part of a KL controller, carried in the train state.

  Attributes:
    coef: Current KL coefficient beta, float32 scalar.
  """

  coef: jax.Array


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """How the KL to the reference policy is estimated, applied and controlled.

  Attributes:
    estimator: Key of `KL_ESTIMATORS` used per token.
    in_reward: True: subtract coef * KL per token from the reward (Ziegler et al. 2019,
      InstructGPT); False: add coef * KL to the loss instead (GRPO, Shao et al. 2024).
    init_coef: Initial coefficient beta.
    controller: Key of `KL_CONTROLLERS` ("fixed" or "adaptive").
    target: Target KL per sequence of the adaptive controller (Ziegler et al.: 6 nats).
    horizon: Horizon of the adaptive controller, in samples (Ziegler et al.: 10000).
    loss_average: How the KL in the loss (in_reward=False) is averaged: "token", over the valid
      tokens of the minibatch; "sequence", per sequence over its tokens and then over the
      sequences, as GRPO's objective writes it (Shao et al. 2024, eq. 3:
      1/G sum_i 1/|o_i| sum_t KL_it).
  """

  estimator: str = "k1"
  in_reward: bool = True
  init_coef: float = 0.05
  controller: str = "fixed"
  target: float = 6.0
  horizon: int = 10000
  loss_average: str = "token"

  def __post_init__(self):
    if self.loss_average not in ("token", "sequence"):
      raise ValueError(f"kl.loss_average must be 'token' or 'sequence', got "
                       f"{self.loss_average!r}")
    if self.init_coef < 0:
      raise ValueError(f"init_coef must be >= 0, got {self.init_coef}")
    if self.target <= 0:
      raise ValueError(f"target must be > 0, got {self.target}")
    if self.horizon <= 0:
      raise ValueError(f"horizon must be > 0, got {self.horizon}")


KLController = Callable[[KLConfig, KLControllerState, jax.Array, jax.Array], KLControllerState]

KL_CONTROLLERS: Registry[KLController] = Registry("KL controller")


@KL_CONTROLLERS.register("fixed")
def fixed_kl_controller(cfg: KLConfig, state: KLControllerState, current_kl: jax.Array,
                        n_steps: jax.Array) -> KLControllerState:
  """beta stays constant."""
  del cfg, current_kl, n_steps  # The fixed controller ignores feedback by definition.
  return state


@KL_CONTROLLERS.register("adaptive")
def adaptive_kl_controller(cfg: KLConfig, state: KLControllerState, current_kl: jax.Array,
                           n_steps: jax.Array) -> KLControllerState:
  """Proportional controller of Ziegler et al. 2019 (eq. in section 2.2).

  e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
  """
  err = jnp.clip(current_kl / cfg.target - 1.0, -0.2, 0.2)
  mult = 1.0 + err * n_steps / cfg.horizon
  return state.replace(coef=state.coef * mult)


def init_kl_controller(cfg: KLConfig) -> KLControllerState:
  """Initial state, coef = cfg.init_coef; also checks that `cfg` names registered components."""
  KL_ESTIMATORS.get(cfg.estimator)
  KL_CONTROLLERS.get(cfg.controller)
  return KLControllerState(coef=jnp.asarray(cfg.init_coef, jnp.float32))


def update_kl_controller(cfg: KLConfig, state: KLControllerState, current_kl: jax.Array,
                         n_steps: int | jax.Array) -> KLControllerState:
  """One controller step after observing `current_kl` over `n_steps` samples. Pure, jittable.

  Args:
    cfg: Static config (hashable; pass as a static argument under jit).
    state: Current state.
    current_kl: Observed mean KL per sequence, scalar.
    n_steps: Number of samples the observation covers (the batch size in Ziegler et al.).
  """
  current_kl = jnp.asarray(current_kl, jnp.float32)
  n_steps = jnp.asarray(n_steps, jnp.float32)
  chex.assert_rank([state.coef, current_kl, n_steps], 0)
  new_state = KL_CONTROLLERS.get(cfg.controller)(cfg, state, current_kl, n_steps)
  chex.assert_rank(new_state.coef, 0)
  return new_state.replace(coef=new_state.coef.astype(jnp.float32))
