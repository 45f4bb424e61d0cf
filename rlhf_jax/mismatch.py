"""Rollout / trainer mismatch: how far the sampler's log-probs are from the trainer's forward on
the same tokens, and the corrections by name.

The sampler (KV-cache decoding, possibly another kernel, dtype or engine) and the trainer's full
forward need not give the same log pi_old(y_t) for the same weights; the PPO ratio then trusts
numbers the trainer would not produce (Yao et al. 2025, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training"). `collect` recomputes the log-probs with the trainer's forward
(`Scored.trainer_logprobs`) and logs, every iteration,

  mismatch/abs_logp_diff = mean over valid tokens of |log pi_train - log pi_sampler|,
  mismatch/max_ratio     = max over valid tokens of pi_train / pi_sampler (and min_ratio),

(~1e-6 and ~1 in float32 on CPU, where both are the same model). `ppo_update` can then use the
trainer's log-probs as pi_old (`recompute_logprobs`) and weight each token's advantage by a
correction of rho_t = pi_train(y_t) / pi_sampler(y_t), registered in `CORRECTIONS`:

  none:     w = 1;
  tis:      w = min(rho_t, tis_cap), truncated importance sampling (Yao et al. 2025; Ionides 2008);
  icepop:   w = 1[icepop_low <= rho_t <= icepop_high], tokens outside masked (IcePop, Ling Team
            2025, arXiv:2510.18855);
  seq_mask: w_i = 1[1/seq_mask_threshold <= exp(mean_t log rho_it) <= seq_mask_threshold], whole
            sequences dropped by the geometric mean of their ratios (verl's geometric rejection).

The weights multiply the advantages after whitening, as stop-gradient constants: every registered
loss is positively homogeneous in A per token (max(-wA r, -wA clip r) = w max(-A r, -A clip r)
for w >= 0), so w scales a token's loss term and w = 0 removes it while its token still counts in
the normaliser (as verl's masked modes do).
"""

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean
from rlhf_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class MismatchConfig:
  """What `ppo_update` does about the sampler / trainer log-prob mismatch.

  Attributes:
    correction: Key of `CORRECTIONS` ("none", "tis", "icepop", "seq_mask").
    recompute_logprobs: Use the trainer's forward (`Scored.trainer_logprobs`) as pi_old in the
      ratio instead of the sampler's log-probs.
    log_metrics: Log the mismatch metrics even without a correction or recompute. The
      trainer's forward on the sampled tokens costs one more policy forward per iteration, so
      `collect` runs it only when something reads it.
    tis_cap: C of "tis": w = min(rho, C).
    icepop_low, icepop_high: The band of "icepop": tokens with rho outside it get w = 0.
    seq_mask_threshold: C of "seq_mask": sequences whose geometric-mean ratio is outside
      [1/C, C] get w = 0.
  """
  correction: str = "none"
  recompute_logprobs: bool = False
  tis_cap: float = 2.0
  icepop_low: float = 0.5
  icepop_high: float = 2.0
  seq_mask_threshold: float = 2.0
  log_metrics: bool = False

  @property
  def needs_trainer_logprobs(self) -> bool:
    return self.correction != "none" or self.recompute_logprobs or self.log_metrics

  def __post_init__(self):
    CORRECTIONS.get(self.correction)
    if self.tis_cap <= 0:
      raise ValueError(f"mismatch.tis_cap must be > 0, got {self.tis_cap}")
    if not 0 <= self.icepop_low <= 1 <= self.icepop_high:
      raise ValueError(f"mismatch needs icepop_low <= 1 <= icepop_high, got "
                       f"{self.icepop_low}, {self.icepop_high}")
    if self.seq_mask_threshold < 1:
      raise ValueError(f"mismatch.seq_mask_threshold must be >= 1, got "
                       f"{self.seq_mask_threshold}")


Correction = Callable[[MismatchConfig, jax.Array, jax.Array], jax.Array]
CORRECTIONS: Registry[Correction] = Registry("mismatch correction")


def _valid(log_rho: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  chex.assert_rank(log_rho, 2)
  chex.assert_equal_shape([log_rho, mask])
  valid = mask.astype(bool)
  return jnp.where(valid, log_rho.astype(jnp.float32), 0.0), valid


@CORRECTIONS.register("none")
def no_correction(cfg: MismatchConfig, log_rho: jax.Array, mask: jax.Array) -> jax.Array:
  """w = 1 on valid tokens."""
  del cfg
  _, valid = _valid(log_rho, mask)
  return valid.astype(jnp.float32)


@CORRECTIONS.register("tis")
def tis(cfg: MismatchConfig, log_rho: jax.Array, mask: jax.Array) -> jax.Array:
  """w_t = min(exp(log_rho_t), tis_cap), 0 on padding."""
  log_rho, valid = _valid(log_rho, mask)
  return jnp.where(valid, jnp.minimum(jnp.exp(log_rho), cfg.tis_cap), 0.0)


@CORRECTIONS.register("icepop")
def icepop(cfg: MismatchConfig, log_rho: jax.Array, mask: jax.Array) -> jax.Array:
  """w_t = 1[icepop_low <= exp(log_rho_t) <= icepop_high], 0 on padding."""
  log_rho, valid = _valid(log_rho, mask)
  rho = jnp.exp(log_rho)
  return (valid & (rho >= cfg.icepop_low) & (rho <= cfg.icepop_high)).astype(jnp.float32)


@CORRECTIONS.register("seq_mask")
def seq_mask(cfg: MismatchConfig, log_rho: jax.Array, mask: jax.Array) -> jax.Array:
  """w_it = 1[|mean_t log_rho_it| <= log seq_mask_threshold] on the valid tokens of sequence i."""
  log_rho, valid = _valid(log_rho, mask)
  n = jnp.maximum(valid.sum(-1), 1)
  keep = jnp.abs(log_rho.sum(-1) / n) <= jnp.log(cfg.seq_mask_threshold)
  return (valid & keep[:, None]).astype(jnp.float32)


def correction_weights(cfg: MismatchConfig, trainer_logprobs: jax.Array,
                       sampler_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, N] float32 weights of `cfg.correction` on log rho = trainer - sampler, stop-gradient."""
  log_rho = jax.lax.stop_gradient(trainer_logprobs - sampler_logprobs)
  return CORRECTIONS.get(cfg.correction)(cfg, log_rho, mask)


def mismatch_metrics(trainer_logprobs: jax.Array, sampler_logprobs: jax.Array,
                     mask: jax.Array) -> dict[str, jax.Array]:
  """mean |log pi_train - log pi_sampler| and the max / min of pi_train / pi_sampler over valid
  tokens (1 where there are none)."""
  log_rho, valid = _valid(trainer_logprobs - sampler_logprobs, mask)
  some = valid.any()
  return {
      "mismatch/abs_logp_diff": masked_mean(jnp.abs(log_rho), valid),
      "mismatch/max_ratio": jnp.where(some, jnp.exp(jnp.max(jnp.where(valid, log_rho, -jnp.inf))),
                                      1.0),
      "mismatch/min_ratio": jnp.where(some, jnp.exp(jnp.min(jnp.where(valid, log_rho, jnp.inf))),
                                      1.0),
  }
