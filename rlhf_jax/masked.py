"""Reductions over the valid entries of padded arrays.

A mask has the shape of the data, float32 or bool, with 1 (True) marking a valid entry; any non-zero
value counts as valid. Masked entries are selected away with `jnp.where`, never multiplied by 0, so
padding holding inf or NaN (e.g. log-probabilities of pad tokens) neither leaks into results nor
into gradients. Statistics are computed in float32 whatever the input dtype.
"""

import chex
import jax
import jax.numpy as jnp

WHITEN_EPS = 1e-8

Axis = int | tuple[int, ...] | None


def _select(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x in float32 with masked entries set to 0, bool mask)."""
  chex.assert_equal_shape([x, mask])
  valid = mask.astype(bool)
  # Zeroing first, not after the arithmetic, keeps NaN out of the backward pass too.
  return jnp.where(valid, x.astype(jnp.float32), 0.0), valid


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
  """sum_i m_i x_i over `axis` (all axes when None), in float32."""
  return jnp.sum(_select(x, mask)[0], axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
  """sum_i m_i x_i / sum_i m_i over `axis`; 0 where no entry is valid (instead of 0/0 = NaN)."""
  xs, valid = _select(x, mask)
  count = jnp.sum(valid, axis=axis, dtype=jnp.float32)
  return jnp.sum(xs, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of the valid entries of `x` (all axes).

  var = sum_i m_i (x_i - mean)^2 / (n - 1) with Bessel's correction (`unbiased=True`, as torch.var
  and TRL's `masked_var`), else / n; n = sum_i m_i. Returns 0 when the denominator would be <= 0.
  """
  xs, valid = _select(x, mask)
  n = jnp.sum(valid, dtype=jnp.float32)
  centred = jnp.where(valid, xs - jnp.sum(xs) / jnp.maximum(n, 1.0), 0.0)
  denom = n - 1.0 if unbiased else n
  return jnp.sum(jnp.square(centred)) / jnp.maximum(denom, 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """Whitens `x` with the statistics of its valid entries; output is 0 where the mask is 0.

  y = (x - mean) / sqrt(var + 1e-8), with mean and unbiased var over valid entries only; with
  `shift_mean=False` the mean is added back (scale only), as in TRL / lm-human-preferences
  `whiten(..., shift_mean=False)` used for rewards.
  """
  xs, valid = _select(x, mask)
  mean = masked_mean(xs, valid)
  whitened = (xs - mean) * jax.lax.rsqrt(masked_var(xs, valid, unbiased=True) + WHITEN_EPS)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(valid, whitened, 0.0)


def last_valid_index(mask: jax.Array) -> jax.Array:
  """Index [B] of the last valid entry of each row of a [B, T] mask (0 for an empty row)."""
  chex.assert_rank(mask, 2)
  return jnp.max(jnp.where(mask.astype(bool), jnp.arange(mask.shape[-1]), 0), axis=-1)


def last_valid_mask(mask: jax.Array) -> jax.Array:
  """[B, T] bool, True at the last valid entry of each row (nowhere in an empty row)."""
  valid = mask.astype(bool)
  return (jnp.arange(mask.shape[-1]) == last_valid_index(mask)[:, None]) & valid
