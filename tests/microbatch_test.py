"""rlhf_jax.microbatch: strided split and the scan that sums over microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import microbatch


def test_split_is_strided_and_keeps_every_row_once():
  batch = {"x": jnp.arange(12).reshape(6, 2), "y": jnp.arange(6)}
  micros = microbatch.split(batch, 2)
  assert micros["x"].shape == (3, 2, 2)
  np.testing.assert_array_equal(micros["y"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(micros["x"][1], batch["x"][np.array([1, 4])])


def test_accumulate_sums_fn_over_microbatches():
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.ones((3,), jnp.float32)
  fn = jax.jit(lambda w, b: (jnp.sum(b["x"] @ w), jnp.sum(b["x"], axis=0)))
  want = fn(w, {"x": x})
  for micro in (None, 8, 4, 1):
    got = microbatch.accumulate(fn, w, {"x": x}, micro)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


def test_low_precision_outputs_are_summed_in_float32():
  # Adding 1/256 at a time in bfloat16 stalls at 1.0, where its spacing is 1/128.
  x = jnp.full((512, 1), 1.0 / 256, jnp.bfloat16)
  got = microbatch.accumulate(lambda _, b: jnp.sum(b["x"]), None, {"x": x}, 1)
  assert got.dtype == jnp.bfloat16 and float(got) == 2.0


def test_bad_micro_batch_size_is_a_value_error():
  with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the 8 rows"):
    microbatch.split({"x": jnp.zeros((8, 2))}, 3)
  with pytest.raises(ValueError, match="share their leading"):
    microbatch.num_rows({"x": jnp.zeros((8, 2)), "y": jnp.zeros((4,))})
