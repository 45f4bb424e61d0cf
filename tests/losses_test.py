"""Tests for rlhf_jax.losses against per-token Python loop transcriptions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import logprobs, losses
from rlhf_jax.registry import UnknownNameError

LENGTHS = (7, 3, 0, 5, 1, 6)  # One full row, one empty row.
B, T, V = len(LENGTHS), 7, 11

policy_loss = jax.jit(losses.policy_loss, static_argnums=0)
value_loss = jax.jit(losses.value_loss, static_argnums=0)


def _mask():
  return (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)


def _policy_batch(seed=0):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
  # Log-ratios up to about +-2 so both clip sides and the dual clip (ratio > c) bind.
  logp = (old + rng.normal(0.0, 0.8, (B, T))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
  return logp, old, adv, _mask()


def _token_terms(lp, old, a, eps_low, eps_high):
  ratio = math.exp(float(lp) - float(old))
  unclipped = -a * ratio
  clipped = -a * min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
  return max(unclipped, clipped), clipped > unclipped, (ratio - 1.0) - math.log(ratio)


def policy_reference(name, cfg, logp, old, adv, mask):
  """Returns (loss, clipfrac, approx_kl[, dual_clipfrac]) in float64."""
  eps_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
  per_token, clip_flags, kls, dual_flags, rows = [], [], [], [], []
  for b in range(B):
    row = []
    for t in range(T):
      if not mask[b, t]:
        continue
      a = float(adv[b, t])
      loss, clipped, kl = _token_terms(logp[b, t], old[b, t], a, cfg.clip_eps, eps_high)
      if name == "ppo_dual_clip" and a < 0:
        dual = -cfg.dual_clip_c * a < loss
        dual_flags.append(dual)
        loss = min(loss, -cfg.dual_clip_c * a)
      else:
        dual_flags.append(False)
      if name == "reinforce":
        loss, clipped = -a * math.exp(float(logp[b, t]) - float(old[b, t])), False
      per_token.append(loss)
      row.append(loss)
      clip_flags.append(clipped)
      kls.append(kl)
    if row:
      rows.append(sum(row) / len(row))
  if name == "grpo":
    total = sum(rows) / len(rows)
  else:
    total = sum(per_token) / len(per_token)
  return total, float(np.mean(clip_flags)), float(np.mean(kls)), float(np.mean(dual_flags))


@pytest.mark.parametrize("name,cfg_kwargs", [
    ("ppo", {}),
    ("ppo", {"clip_eps": 0.1, "clip_eps_high": 0.3}),
    ("ppo_dual_clip", {"dual_clip_c": 1.5}),
    ("grpo", {"clip_eps_high": 0.28}),
    ("reinforce", {}),
])
def test_policy_losses_match_loop(name, cfg_kwargs):
  cfg = losses.PolicyLossConfig(name=name, **cfg_kwargs)
  logp, old, adv, mask = _policy_batch()
  loss, aux = policy_loss(cfg, logp, old, adv, mask)
  ref_loss, ref_clipfrac, ref_kl, ref_dual = policy_reference(name, cfg, logp, old, adv, mask)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["clipfrac"], ref_clipfrac, rtol=1e-6)
  np.testing.assert_allclose(aux["approx_kl"], ref_kl, rtol=1e-5)
  if name == "reinforce":
    assert float(aux["clipfrac"]) == 0.0
  else:
    assert 0.0 < ref_clipfrac < 1.0  # The batch exercises clipping.
  if name == "ppo_dual_clip":
    assert ref_dual > 0.0
    np.testing.assert_allclose(aux["dual_clipfrac"], ref_dual, rtol=1e-6)


def test_grpo_differs_from_token_mean_and_ignores_empty_rows():
  cfg = losses.PolicyLossConfig(name="grpo")
  logp, old, adv, mask = _policy_batch(1)
  grpo, _ = losses.policy_loss(cfg, logp, old, adv, mask)
  ppo, _ = losses.policy_loss(losses.PolicyLossConfig(name="ppo"), logp, old, adv, mask)
  assert abs(float(grpo) - float(ppo)) > 1e-4  # Different aggregation for unequal lengths.
  keep = np.array(LENGTHS) > 0
  without_empty, _ = losses.policy_loss(cfg, logp[keep], old[keep], adv[keep], mask[keep])
  np.testing.assert_allclose(grpo, without_empty, rtol=1e-6)


def test_reinforce_gradient_is_minus_advantage_times_grad_logp_on_policy():
  rng = np.random.default_rng(2)
  mask = _mask()
  logits = rng.normal(0.0, 1.0, (B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  adv = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
  cfg = losses.PolicyLossConfig(name="reinforce")
  n_valid = mask.sum()

  # d loss / d logp_t = -A_t m_t / N at ratio 1 (old_logprobs = stop_gradient(logprobs)).
  logp = logprobs.token_logprobs(logits, tokens)
  grad_logp = jax.grad(lambda lp: losses.policy_loss(cfg, lp, jax.lax.stop_gradient(lp), adv,
                                                     mask)[0])(logp)
  np.testing.assert_allclose(grad_logp, -adv * mask / n_valid, rtol=1e-6, atol=1e-8)

  # Through the logits: d logp_t / d logits_t = onehot(token_t) - softmax(logits_t).
  def loss_from_logits(z):
    lp = logprobs.token_logprobs(z, tokens)
    return losses.policy_loss(cfg, lp, jax.lax.stop_gradient(lp), adv, mask)[0]

  grad_logits = jax.jit(jax.grad(loss_from_logits))(logits)
  z = logits.astype(np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.zeros_like(z)
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        onehot = np.eye(V)[tokens[b, t]]
        expected[b, t] = -adv[b, t] / n_valid * (onehot - probs[b, t])
  np.testing.assert_allclose(grad_logits, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ppo", "ppo_dual_clip", "grpo", "reinforce"])
def test_masked_entries_never_influence_policy_losses(name):
  cfg = losses.PolicyLossConfig(name=name)
  logp, old, adv, mask = _policy_batch(3)
  valid = mask > 0
  dirty = (np.where(valid, logp, -np.inf).astype(np.float32),
           np.where(valid, old, np.nan).astype(np.float32),
           np.where(valid, adv, 1e30).astype(np.float32))
  clean_out = losses.policy_loss(cfg, logp, old, adv, mask)
  dirty_out = losses.policy_loss(cfg, *dirty, mask.astype(bool))
  jax.tree.map(np.testing.assert_array_equal, clean_out, dirty_out)
  grad = jax.grad(lambda lp: losses.policy_loss(cfg, lp, dirty[1], dirty[2], mask)[0])(dirty[0])
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[~valid] == 0.0)


def _value_batch(seed=4):
  rng = np.random.default_rng(seed)
  old = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
  values = (old + rng.normal(0.0, 0.4, (B, T))).astype(np.float32)
  returns = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
  return values, old, returns, _mask()


def value_reference(name, clip_eps, values, old, returns, mask):
  terms, flags = [], []
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
      unclipped = (v - r) ** 2
      clipped = (o + min(max(v - o, -clip_eps), clip_eps) - r) ** 2
      if name == "clipped":
        terms.append(max(unclipped, clipped))
        flags.append(clipped > unclipped)
      else:
        terms.append(unclipped)
        flags.append(False)
  return 0.5 * sum(terms) / len(terms), float(np.mean(flags))


@pytest.mark.parametrize("name", ["clipped", "mse"])
def test_value_losses_match_loop(name):
  cfg = losses.ValueLossConfig(name=name, clip_eps=0.2)
  values, old, returns, mask = _value_batch()
  loss, aux = value_loss(cfg, values, old, returns, mask)
  ref_loss, ref_clipfrac = value_reference(name, 0.2, values, old, returns, mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["vf_clipfrac"], ref_clipfrac, rtol=1e-6)
  if name == "clipped":
    assert 0.0 < ref_clipfrac < 1.0


@pytest.mark.parametrize("name", ["clipped", "mse"])
def test_masked_entries_never_influence_value_losses(name):
  cfg = losses.ValueLossConfig(name=name)
  values, old, returns, mask = _value_batch(5)
  valid = mask > 0
  dirty = [np.where(valid, x, fill).astype(np.float32)
           for x, fill in ((values, np.nan), (old, np.inf), (returns, -1e30))]
  jax.tree.map(np.testing.assert_array_equal, losses.value_loss(cfg, values, old, returns, mask),
               losses.value_loss(cfg, *dirty, mask))
  grad = jax.grad(lambda v: losses.value_loss(cfg, v, dirty[1], dirty[2], mask)[0])(dirty[0])
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid] == 0.0)


def test_register_policy_loss_by_decorator_and_fetch_by_name():
  @losses.register_policy_loss("test_only_advantage_mean")
  def advantage_mean(cfg, logprobs, old_logprobs, advantages, mask):
    del cfg, old_logprobs
    loss = -jnp.sum(jnp.where(mask > 0, advantages * logprobs, 0.0)) / jnp.sum(mask)
    return loss, {"clipfrac": jnp.float32(0.0), "approx_kl": jnp.float32(0.0)}

  assert losses.POLICY_LOSSES.get("test_only_advantage_mean") is advantage_mean
  assert "test_only_advantage_mean" in losses.POLICY_LOSSES.names()
  logp, old, adv, mask = _policy_batch(5)
  loss, _ = policy_loss(losses.PolicyLossConfig(name="test_only_advantage_mean"), logp, old, adv,
                        mask)
  valid = mask > 0
  np.testing.assert_allclose(loss, -np.sum((adv * logp)[valid]) / valid.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="already registered"):
    losses.register_policy_loss("ppo")(advantage_mean)


def test_register_value_loss_and_unknown_names():
  @losses.register_value_loss("test_only_abs")
  def abs_loss(cfg, values, old_values, returns, mask):
    del cfg, old_values
    return jnp.sum(jnp.where(mask > 0, jnp.abs(values - returns), 0.0)), {"vf_clipfrac": 0.0}

  values, old, returns, mask = _value_batch()
  loss, _ = losses.value_loss(losses.ValueLossConfig(name="test_only_abs"), values, old, returns,
                              mask)
  np.testing.assert_allclose(loss, np.abs(values - returns)[mask > 0].sum(), rtol=1e-5)
  with pytest.raises(UnknownNameError, match="registered: .*grpo, .*ppo, ppo_dual_clip, reinforce"):
    losses.policy_loss(losses.PolicyLossConfig(name="a2c"), values, old, returns, mask)
  with pytest.raises(KeyError, match="unknown value loss 'huber'; registered: clipped, mse"):
    losses.value_loss(losses.ValueLossConfig(name="huber"), values, old, returns, mask)


def test_config_defaults_and_validation():
  cfg = losses.PolicyLossConfig()
  assert cfg.eps_high == 0.2
  assert losses.PolicyLossConfig(clip_eps_high=0.28).eps_high == 0.28
  hash(cfg)
  hash(losses.ValueLossConfig())
  with pytest.raises(ValueError, match="dual_clip_c"):
    losses.PolicyLossConfig(dual_clip_c=1.0)
  with pytest.raises(ValueError, match="clip_eps"):
    losses.ValueLossConfig(clip_eps=-0.1)
