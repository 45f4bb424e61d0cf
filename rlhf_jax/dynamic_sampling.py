"""DAPO's dynamic sampling: drop the groups whose completions all got the same reward.

With group-relative advantages (GRPO, Dr. GRPO, DAPO, RLOO) a group whose G completions score
alike has A = 0 on every token: it costs a forward and backward and teaches nothing, and as a
policy gets good (or stays bad) on a prompt, more and more groups are such. DAPO (Yu et al.
2025, arXiv:2503.14476, section 3.2) keeps sampling prompts until the batch is full of groups with

  0 < |{i : r_i = max reward}| < G,  i.e. max_i r_i - min_i r_i > 0 over the group's rewards,

so every training batch has as many informative groups as it can. Shapes stay fixed: each sampled
batch is one `collect` of `batch_size` prompts x `group_size` completions; the kept groups of up to
`max_batches` such batches fill the training batch in sampling order, and when they run short the
dropped groups fill the rest (their advantages are zero where the estimator is group-relative;
`filled_groups` counts them). The rewards compared are `Scored.scores`, the sequence scores after
normalisation and the EOS penalty: what the estimators see.
"""

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.score import Scored


@dataclasses.dataclass(frozen=True)
class DynamicSamplingConfig:
  """Attributes:
    enabled: Refill the batch with groups whose rewards differ (needs group_size > 1).
    max_batches: At most this many `collect` calls (batches of prompts) per iteration, the
      first included; 1 keeps the batch as sampled.
    tolerance: Rewards within this of each other count as the same.
  """
  enabled: bool = False
  max_batches: int = 4
  tolerance: float = 1e-6

  def __post_init__(self):
    if self.max_batches < 1:
      raise ValueError(f"dynamic_sampling.max_batches must be >= 1, got {self.max_batches}")
    if not self.tolerance >= 0:
      raise ValueError(f"dynamic_sampling.tolerance must be >= 0, got {self.tolerance}")


def informative_groups(scores: jax.Array, group_size: int, tolerance: float = 1e-6) -> jax.Array:
  """[B] scores, groups of `group_size` consecutive rows -> [B / G] bool: max - min > tolerance."""
  chex.assert_rank(scores, 1)
  if scores.shape[0] % group_size:
    raise ValueError(f"{scores.shape[0]} rows are not groups of {group_size}")
  groups = scores.reshape(-1, group_size)
  return jnp.max(groups, axis=1) - jnp.min(groups, axis=1) > tolerance


def fill_batch(batches: list[Scored], keep: list[jax.Array], group_size: int) -> Scored:
  """The first len(keep[0]) groups of the concatenated batches, kept groups first (each in
  sampling order), then the dropped ones: a batch of the first batch's shape."""
  num_groups = keep[0].shape[0]
  keep = jnp.concatenate(keep)
  # A stable sort on "dropped" puts the kept groups first without reordering either part.
  order = jnp.argsort(jnp.logical_not(keep), stable=True)[:num_groups]
  rows = (order[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
  return jax.tree.map(lambda *xs: jnp.take(jnp.concatenate(xs), rows, axis=0), *batches)


def fill_metrics(keep: list[jax.Array]) -> dict[str, jax.Array]:
  """dynamic_sampling/: batches sampled, groups dropped among them, and dropped groups that had
  to fill the training batch for want of kept ones."""
  num_groups = keep[0].shape[0]
  kept = sum(jnp.sum(k) for k in keep)
  return {"dynamic_sampling/batches": jnp.asarray(len(keep), jnp.float32),
          "dynamic_sampling/dropped_groups": (len(keep) * num_groups - kept).astype(jnp.float32),
          "dynamic_sampling/filled_groups": jnp.maximum(num_groups - kept, 0).astype(jnp.float32)}


def refill(cfg: DynamicSamplingConfig, group_size: int, num_groups: int,
           sample: Callable[[int], tuple[Scored, dict[str, Any]]],
           fill: Callable[[list[Scored], list[jax.Array]], Scored]):
  """Samples batches `sample(0)`, `sample(1)`, ... (each a collect's (Scored, metrics) of
  `num_groups` groups) until their informative groups fill a batch or `cfg.max_batches` were
  drawn; returns (the batch `fill(batches, keep)` makes of them, e.g. a jitted `fill_batch`; the
  metrics, averaged over every batch sampled: the policy's, not the filter's, plus
  `fill_metrics`)."""
  batches, sampled_metrics, keep = [], [], []
  while len(batches) < cfg.max_batches and (
      not keep or int(sum(jnp.sum(k) for k in keep)) < num_groups):
    scored, metrics = sample(len(batches))
    batches.append(scored)
    sampled_metrics.append(metrics)
    keep.append(informative_groups(scored.scores, group_size, cfg.tolerance))
  metrics = jax.tree.map(lambda *v: sum(v) / len(v), *sampled_metrics)
  return fill(batches, keep), {**metrics, **fill_metrics(keep)}
