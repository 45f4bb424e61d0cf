"""Tests for rlhf_jax.logprobs against NumPy and against the unchunked computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import logprobs

B, T, V = 6, 7, 11

def _log_softmax_reference(logits):
  z = logits.astype(np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def test_token_logprobs_matches_numpy():
  rng = np.random.default_rng(6)
  logits = rng.normal(0.0, 3.0, (B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  out = jax.jit(logprobs.token_logprobs)(logits, tokens)
  ref = _log_softmax_reference(logits)
  expected = np.array([[ref[b, t, tokens[b, t]] for t in range(T)] for b in range(B)])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  low = logprobs.token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens)
  assert low.dtype == jnp.float32


def test_entropy_matches_numpy_and_is_stable():
  rng = np.random.default_rng(7)
  logits = rng.normal(0.0, 2.0, (B, T, V)).astype(np.float32)
  logits[0, 0] += 1e4  # Huge logits: a naive softmax overflows.
  logits[1, :, :3] = -np.inf  # Banned vocabulary entries.
  logits[2, 0] = -np.inf
  logits[2, 0, 4] = 0.0  # A one-hot distribution: entropy 0.
  out = jax.jit(logprobs.entropy_from_logits)(logits)
  logp = _log_softmax_reference(logits)
  p = np.exp(logp)
  expected = -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=-1)
  assert out.shape == (B, T) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[2, 0], 0.0, atol=1e-7)
  grad = jax.grad(lambda z: jnp.sum(logprobs.entropy_from_logits(z)))(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))


def _linear_head(params):
  return lambda h: h @ params["w"] + params["b"]


def _chunked_objective(params, hidden, tokens, weights, chunk_size):
  logp, ent = logprobs.chunked_token_logprobs(hidden, _linear_head(params), tokens,
                                            chunk_size=chunk_size, temperature=0.7,
                                            with_entropy=True)
  return jnp.sum(weights[0] * logp + weights[1] * ent)


def _full_objective(params, hidden, tokens, weights):
  logits = _linear_head(params)(hidden) / 0.7
  return jnp.sum(weights[0] * logprobs.token_logprobs(logits, tokens)
                 + weights[1] * logprobs.entropy_from_logits(logits))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16])
def test_chunked_token_logprobs_matches_unchunked_values_and_gradients(chunk_size):
  # N = 7 is not a multiple of 3: the last chunk is padded.
  rng = np.random.default_rng(8)
  b, n, d, v = 3, 7, 5, 11
  params = {"w": jnp.asarray(rng.normal(0, 1, (d, v)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 1, (v,)), jnp.float32)}
  hidden = jnp.asarray(rng.normal(0, 1, (b, n, d)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (b, n)), jnp.int32)
  weights = jnp.asarray(rng.normal(0, 1, (2, b, n)), jnp.float32)
  logits = _linear_head(params)(hidden) / 0.7

  @jax.jit
  def chunked(params, hidden, tokens):
    head = _linear_head(params)
    return (logprobs.chunked_token_logprobs(hidden, head, tokens, chunk_size=chunk_size,
                                          temperature=0.7, with_entropy=True),
            logprobs.chunked_token_logprobs(hidden, head, tokens, chunk_size=chunk_size,
                                          temperature=0.7))

  (logp, ent), only_logp = chunked(params, hidden, tokens)
  assert logp.shape == ent.shape == (b, n) and logp.dtype == ent.dtype == jnp.float32
  ref = _log_softmax_reference(np.asarray(logits))
  picked = np.take_along_axis(ref, np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, picked, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, -np.sum(np.exp(ref) * ref, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(only_logp, logp, rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(_chunked_objective, argnums=(0, 1)), static_argnums=4)(
      params, hidden, tokens, weights, chunk_size)
  expected = jax.jit(jax.grad(_full_objective, argnums=(0, 1)))(params, hidden, tokens, weights)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_token_logprobs_rejects_bad_chunk_size():
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs.chunked_token_logprobs(jnp.zeros((1, 2, 3)), lambda h: h, jnp.zeros((1, 2), jnp.int32),
                                  chunk_size=0)


def test_chunked_token_logprobs_gradient_never_holds_the_full_logits():
  b, n, d, v, chunk = 4, 512, 32, 32768, 32
  full_logits_bytes = b * n * v * 4  # 256 MiB
  params = {"w": jax.ShapeDtypeStruct((d, v), jnp.float32),
            "b": jax.ShapeDtypeStruct((v,), jnp.float32)}
  args = (params, jax.ShapeDtypeStruct((b, n, d), jnp.float32),
          jax.ShapeDtypeStruct((b, n), jnp.int32), jax.ShapeDtypeStruct((2, b, n), jnp.float32))

  def temp_bytes(fn):
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(lambda *a: _chunked_objective(*a, chunk_size=chunk))
  full = temp_bytes(_full_objective)
  assert full >= full_logits_bytes  # the measurement sees the [B, N, V] buffer when it exists
  # A handful of one-chunk buffers (logits, their softmax and cotangent): 1/16 of the full each.
  assert chunked < full_logits_bytes / 3, (chunked, full)
