"""Tests for rlhf_jax.kl: estimators against NumPy, controllers against a Python loop."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl
from rlhf_jax.registry import UnknownNameError


def _logprobs(seed=0, shape=(4, 6)):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-2.0, 1.0, shape).astype(np.float32)
  ref = (logp + rng.normal(0.0, 0.7, shape)).astype(np.float32)
  return logp, ref


def _reference(name, logp, ref):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    d = float(logp[idx]) - float(ref[idx])
    out[idx] = {
        "k1": d,
        "k2": 0.5 * d * d,
        "k3": math.exp(-d) + d - 1.0,
        "abs": abs(d),
    }[name]
  return out


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs"])
def test_estimators_match_formulas(name):
  logp, ref = _logprobs()
  out = jax.jit(kl.kl_penalty, static_argnums=0)(name, logp, ref)
  assert out.shape == logp.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _reference(name, logp, ref), rtol=1e-5, atol=1e-6)


def test_k1_and_k3_are_unbiased_for_exact_kl():
  # E_{x~p}[k(x)] over a full support equals KL(p || q) exactly for k1 and k3 (Schulman 2020).
  rng = np.random.default_rng(1)
  logp = np.log(rng.dirichlet(np.ones(10)))
  logq = np.log(rng.dirichlet(np.ones(10)))
  p = np.exp(logp)
  exact = np.sum(p * (logp - logq))
  for name in ("k1", "k3"):
    per_x = kl.kl_penalty(name, logp[None].astype(np.float32), logq[None].astype(np.float32))
    np.testing.assert_allclose(np.sum(p * np.asarray(per_x[0])), exact, rtol=1e-5)
  k3 = kl.kl_penalty("k3", logp[None].astype(np.float32), logq[None].astype(np.float32))
  assert np.all(np.asarray(k3) >= 0.0)


def test_unknown_estimator_lists_names():
  logp, ref = _logprobs()
  with pytest.raises(UnknownNameError, match="registered: abs, k1, k2, k3"):
    kl.kl_penalty("k4", logp, ref)


def test_fixed_controller_keeps_coef():
  cfg = kl.KLConfig(init_coef=0.1)
  state = kl.init_kl_controller(cfg)
  assert state.coef.dtype == jnp.float32 and state.coef.shape == ()
  new = kl.update_kl_controller(cfg, state, jnp.float32(100.0), 64)
  np.testing.assert_allclose(new.coef, 0.1, rtol=1e-7)


def test_adaptive_controller_matches_python_loop():
  cfg = kl.KLConfig(controller="adaptive", init_coef=0.2, target=6.0, horizon=1000)
  # Covers clipping at +0.2 (KL 20), at -0.2 (KL 0.5) and the linear range.
  kls = [20.0, 0.5, 6.0, 7.0, 5.5, 3.0, 9.0]
  n_steps = 64
  update = jax.jit(kl.update_kl_controller, static_argnums=0)
  state = kl.init_kl_controller(cfg)
  coef = 0.2
  for current in kls:
    err = min(max(current / 6.0 - 1.0, -0.2), 0.2)
    coef *= 1.0 + err * n_steps / 1000
    state = update(cfg, state, jnp.float32(current), jnp.int32(n_steps))
    np.testing.assert_allclose(state.coef, coef, rtol=1e-6)
  assert state.coef.dtype == jnp.float32


def test_custom_controller_by_name():
  @kl.KL_CONTROLLERS.register("test_only_halving")
  def halving(cfg, state, current_kl, n_steps):
    del cfg, current_kl, n_steps
    return state.replace(coef=state.coef / 2)

  cfg = kl.KLConfig(controller="test_only_halving", init_coef=1.0)
  state = kl.update_kl_controller(cfg, kl.init_kl_controller(cfg), 1.0, 1)
  np.testing.assert_allclose(state.coef, 0.5)


def test_config_validation():
  with pytest.raises(UnknownNameError, match="registered: .*adaptive.*fixed"):
    kl.init_kl_controller(kl.KLConfig(controller="pid"))
  with pytest.raises(UnknownNameError, match="unknown KL estimator"):
    kl.init_kl_controller(kl.KLConfig(estimator="k9"))
  with pytest.raises(ValueError, match="target"):
    kl.KLConfig(target=0.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    kl.KLConfig().init_coef = 1.0  # type: ignore[misc]
  hash(kl.KLConfig())  # Static jit arguments must be hashable.
