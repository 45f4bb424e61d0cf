"""Tests for rlhf_jax.masked against NumPy on the valid entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import masked


def _data(seed=0, shape=(5, 7)):
  rng = np.random.default_rng(seed)
  x = rng.normal(1.5, 2.0, shape).astype(np.float32)
  mask = (rng.uniform(size=shape) < 0.6).astype(np.float32)
  mask[0] = 0.0  # An empty row.
  mask[1] = 1.0  # A full row.
  return x, mask


def _valid(x, mask):
  return x[mask.astype(bool)].astype(np.float64)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_sum_and_mean(axis):
  x, mask = _data()
  expected_sum = np.sum(np.where(mask > 0, x, 0.0).astype(np.float64), axis=axis)
  count = np.sum(mask, axis=axis)
  expected_mean = np.where(count > 0, expected_sum / np.maximum(count, 1), 0.0)
  np.testing.assert_allclose(masked.masked_sum(x, mask, axis=axis), expected_sum, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(masked.masked_mean(x, mask, axis=axis), expected_mean, rtol=1e-5,
                             atol=1e-6)
  if axis == 1:  # Row 0 is empty: mean 0 rather than NaN.
    assert float(masked.masked_mean(x, mask, axis=1)[0]) == 0.0


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(unbiased):
  x, mask = _data(1)
  expected = np.var(_valid(x, mask), ddof=1 if unbiased else 0)
  np.testing.assert_allclose(masked.masked_var(x, mask, unbiased=unbiased), expected, rtol=1e-5)


def test_whiten_mean0_std1_over_valid_entries():
  x, mask = _data(2)
  y = np.asarray(jax.jit(masked.masked_whiten)(x, mask))
  valid = _valid(y, mask)
  np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(valid.std(ddof=1), 1.0, rtol=1e-5)
  assert np.all(y[mask == 0] == 0.0)
  ref = (_valid(x, mask) - _valid(x, mask).mean()) / np.sqrt(_valid(x, mask).var(ddof=1) + 1e-8)
  np.testing.assert_allclose(valid, ref, rtol=1e-5, atol=1e-6)


def test_whiten_without_mean_shift_keeps_the_mean():
  x, mask = _data(3)
  y = masked.masked_whiten(x, mask, shift_mean=False)
  vx, vy = _valid(x, mask), _valid(np.asarray(y), mask)
  np.testing.assert_allclose(vy.mean(), vx.mean(), rtol=1e-5)
  np.testing.assert_allclose(vy.std(ddof=1), 1.0, rtol=1e-5)


def test_empty_mask_is_safe():
  x, _ = _data()
  mask = np.zeros_like(x)
  assert float(masked.masked_mean(x, mask)) == 0.0
  assert float(masked.masked_var(x, mask)) == 0.0
  assert np.all(np.asarray(masked.masked_whiten(x, mask)) == 0.0)
  one = np.zeros_like(x)
  one[2, 3] = 1.0
  assert float(masked.masked_var(x, one)) == 0.0  # n - 1 = 0.


def test_masked_entries_do_not_influence_values_or_gradients():
  x, mask = _data(4)
  garbage = np.where(mask > 0, x, np.float32(np.nan))
  garbage[0, 0] = np.inf
  for fn in (masked.masked_sum, masked.masked_mean, masked.masked_var, masked.masked_whiten):
    np.testing.assert_array_equal(fn(garbage, mask), fn(x, mask))
  grad = jax.grad(lambda v: jnp.sum(masked.masked_whiten(v, mask) ** 3))(jnp.asarray(garbage))
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_bool_mask_and_low_precision_input():
  x, mask = _data(5)
  np.testing.assert_array_equal(masked.masked_whiten(x, mask.astype(bool)),
                                masked.masked_whiten(x, mask))
  out = masked.masked_mean(jnp.asarray(x, jnp.bfloat16), mask)
  assert out.dtype == jnp.float32
