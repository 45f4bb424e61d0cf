"""Tests for rlhf_jax.policy_losses against per-row / per-token NumPy loop transcriptions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses  # Importing rlhf_jax registers the policy_losses module's names.

LENGTHS = (7, 3, 0, 5, 1, 6)  # One full row, one of length 1, one all padding.
B, T = len(LENGTHS), 7
NAMES = ("gspo", "gspo_token", "dr_grpo", "dapo", "cispo", "gmpo", "sapo")
# Losses whose gradient is not the derivative of their value (stop-gradients inside): checked
# against an analytic gradient instead of finite differences.
ANALYTIC_GRADIENT = ("gspo_token", "cispo")

policy_loss = jax.jit(losses.policy_loss, static_argnums=0)


def _mask():
  return (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)


def _batch(seed=0, sequence_advantages=False):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
  logp = (old + rng.normal(0.0, 0.8, (B, T))).astype(np.float32)
  shape = (B, 1) if sequence_advantages else (B, T)
  adv = np.broadcast_to(rng.normal(0.0, 1.0, shape), (B, T)).astype(np.float32)
  return logp, old, adv, _mask()


def _rows(mask):
  return [[t for t in range(T) if mask[b, t]] for b in range(B)]


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def reference(name, cfg, logp, old, adv, mask):
  """(loss, aux) of loss `name` in float64, one row and one token at a time."""
  lo, hi = 1.0 - cfg.clip_eps, 1.0 + cfg.eps_high

  def surrogate(ratio, a):
    unclipped, clipped = -a * ratio, -a * min(max(ratio, lo), hi)
    return max(unclipped, clipped), clipped > unclipped

  rows = [r for r in _rows(mask) if r]
  batch_rows = [b for b in range(B) if _rows(mask)[b]]
  ratio = lambda b, t: math.exp(float(logp[b, t]) - float(old[b, t]))  # noqa: E731
  tokens = [(b, t) for b in batch_rows for t in _rows(mask)[b]]
  per_row, row_flags, per_token, token_flags, gates = [], [], [], [], []
  for b, ts in zip(batch_rows, rows, strict=True):
    a_seq = sum(float(adv[b, t]) for t in ts) / len(ts)
    s = math.exp(sum(float(logp[b, t]) - float(old[b, t]) for t in ts) / len(ts))
    if name == "gspo":
      loss, flag = surrogate(s, a_seq)
      per_row.append(loss)
      row_flags.append(flag)
    elif name == "gmpo":
      # The paper's form: -sgn(A) * (prod_t |min(r A, clip(r, e^-eps, e^eps) A)|)^(1/|o|).
      e = cfg.log_clip_eps
      terms = [abs(min(ratio(b, t) * a_seq, min(max(ratio(b, t), math.exp(-e)), math.exp(e)) *
                       a_seq)) for t in ts]
      geo = math.exp(sum(math.log(x) for x in terms) / len(ts))
      per_row.append(-math.copysign(1.0, a_seq) * geo)
      token_flags += [(a_seq > 0 and math.log(ratio(b, t)) > e) or
                      (a_seq < 0 and math.log(ratio(b, t)) < -e) for t in ts]
    else:
      row = []
      for t in ts:
        a, r = float(adv[b, t]), ratio(b, t)
        if name == "gspo_token":
          loss, flag = surrogate(s, a)
        elif name == "cispo":
          w = min(max(r, lo), hi)
          loss, flag = -w * a * float(logp[b, t]), not lo <= r <= hi
        elif name == "sapo":
          tau = cfg.sapo_tau_pos if a > 0 else cfg.sapo_tau_neg
          g = _sigmoid(tau * (r - 1.0))
          loss, flag = -4.0 / tau * g * a, False
          gates.append(4.0 * g * (1.0 - g))
        else:  # dr_grpo, dapo: the PPO per-token loss.
          loss, flag = surrogate(r, a)
        row.append(loss)
        per_token.append(loss)
        token_flags.append(flag)
      per_row.append(sum(row) / len(row))
  if name in ("gspo", "gspo_token", "gmpo", "sapo"):
    total = sum(per_row) / len(per_row)
  elif name == "dr_grpo":
    total = sum(per_token) / (B * T)
  else:
    total = sum(per_token) / len(per_token)
  aux = {
      "clipfrac": float(np.mean(row_flags if name == "gspo" else token_flags)),
      "approx_kl": float(np.mean([ratio(b, t) - 1.0 - math.log(ratio(b, t)) for b, t in tokens])),
  }
  if name == "sapo":
    aux["gate_weight"] = float(np.mean(gates))
  return total, aux


def reference_gradient(name, cfg, logp, old, adv, mask):
  """d loss / d logp [B, T]: finite differences of `reference`, or analytic where the loss has
  stop-gradients (then the derivative of the value is not the gradient)."""
  grad = np.zeros((B, T))
  rows = _rows(mask)
  n_rows, n_tokens = sum(1 for r in rows if r), sum(len(r) for r in rows)
  lo, hi = 1.0 - cfg.clip_eps, 1.0 + cfg.eps_high
  for b, ts in enumerate(rows):
    s = math.exp(sum(float(logp[b, t]) - float(old[b, t]) for t in ts) / max(len(ts), 1))
    for t in ts:
      a, r = float(adv[b, t]), math.exp(float(logp[b, t]) - float(old[b, t]))
      if name == "cispo":
        grad[b, t] = -min(max(r, lo), hi) * a / n_tokens
      elif name == "gspo_token":
        clipped = -a * min(max(s, lo), hi) > -a * s  # Then d clip(s_it) = 0.
        grad[b, t] = 0.0 if clipped else -a * s / (n_rows * len(ts))
      else:
        h = 1e-6
        up, down = logp.astype(np.float64), logp.astype(np.float64)
        up[b, t] += h
        down[b, t] -= h
        grad[b, t] = (reference(name, cfg, up, old, adv, mask)[0] -
                      reference(name, cfg, down, old, adv, mask)[0]) / (2 * h)
  return grad


CASES = [
    ("gspo", {"clip_eps": 0.05, "clip_eps_high": 0.08}),
    ("gspo_token", {"clip_eps": 0.05, "clip_eps_high": 0.08}),
    ("dr_grpo", {}),
    ("dr_grpo", {"clip_eps_high": 0.28}),
    ("dapo", {"clip_eps_high": 0.28}),
    ("cispo", {"clip_eps_high": 0.28}),
    ("cispo", {"clip_eps": 1.0, "clip_eps_high": 2.0}),  # The paper's "no lower bound".
    ("gmpo", {}),
    ("gmpo", {"log_clip_eps": 0.2}),
    ("sapo", {}),
    ("sapo", {"sapo_tau_pos": 0.5, "sapo_tau_neg": 2.0}),
]


@pytest.mark.parametrize("name,cfg_kwargs", CASES)
def test_policy_losses_match_loop_in_value_and_gradient(name, cfg_kwargs):
  cfg = losses.PolicyLossConfig(name=name, **cfg_kwargs)
  logp, old, adv, mask = _batch()
  loss, aux = policy_loss(cfg, logp, old, adv, mask)
  ref_loss, ref_aux = reference(name, cfg, logp, old, adv, mask)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for key, value in ref_aux.items():
    np.testing.assert_allclose(aux[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  if name == "sapo":
    assert float(aux["clipfrac"]) == 0.0
  elif not (name == "cispo" and cfg.clip_eps >= 1.0):
    assert 0.0 < ref_aux["clipfrac"] < 1.0  # The batch exercises clipping, partially.

  grad = jax.jit(jax.grad(lambda lp: losses.policy_loss(cfg, lp, old, adv, mask)[0]))(logp)
  ref_grad = reference_gradient(name, cfg, logp, old, adv, mask)
  np.testing.assert_allclose(grad, ref_grad, rtol=2e-3, atol=2e-6)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)
  assert np.any(np.abs(ref_grad) > 1e-3)


def test_gspo_token_equals_gspo_for_sequence_advantages():
  # The paper's claim: with A_it = A_i, GSPO-token has GSPO's value and gradient.
  logp, old, adv, mask = _batch(1, sequence_advantages=True)

  def run(name):
    cfg = losses.PolicyLossConfig(name=name, clip_eps=0.05, clip_eps_high=0.08)
    return jax.jit(jax.value_and_grad(lambda lp: policy_loss(cfg, lp, old, adv, mask)[0]))(logp)

  (seq_loss, seq_grad), (tok_loss, tok_grad) = run("gspo"), run("gspo_token")
  np.testing.assert_allclose(tok_loss, seq_loss, rtol=1e-6)
  np.testing.assert_allclose(tok_grad, seq_grad, rtol=1e-5, atol=1e-8)
  assert np.any(np.asarray(seq_grad) == 0.0) and np.any(np.abs(np.asarray(seq_grad)) > 1e-3)


# On-policy (r = 1, nothing clipped) every loss's gradient is the plain policy gradient
# -A_t grad logp_t, weighted by its normalisation: what distinguishes them there.
@pytest.mark.parametrize("name", NAMES)
def test_on_policy_gradient_is_the_weighted_policy_gradient(name):
  logp, _, adv, mask = _batch(2, sequence_advantages=True)
  cfg = losses.PolicyLossConfig(name=name, clip_eps_high=0.28)
  grad = jax.jit(jax.grad(lambda lp: policy_loss(cfg, lp, jax.lax.stop_gradient(lp), adv,
                                                 mask)[0]))(logp)
  lengths = np.array(LENGTHS, np.float32)[:, None]
  n_rows = np.count_nonzero(LENGTHS)
  weight = {
      "dr_grpo": np.full_like(lengths, 1.0 / (B * T)),  # A constant: no length bias.
      "dapo": np.full_like(lengths, 1.0 / mask.sum()),
      "cispo": np.full_like(lengths, 1.0 / mask.sum()),
  }.get(name, 1.0 / (n_rows * np.maximum(lengths, 1.0)))  # Per-sequence mean, then over rows.
  np.testing.assert_allclose(grad, np.where(mask > 0, -adv * weight, 0.0), rtol=1e-5, atol=1e-8)


def test_dr_grpo_divides_by_the_padded_batch_size():
  logp, old, adv, mask = _batch(3)
  cfg = losses.PolicyLossConfig(name="dr_grpo")
  loss, _ = policy_loss(cfg, logp, old, adv, mask)
  pad_row = lambda x: np.concatenate([x, np.zeros((1, T), np.float32)])  # noqa: E731
  pad_col = lambda x: np.concatenate([x, np.zeros((B, T), np.float32)], axis=1)  # noqa: E731
  more_rows, _ = policy_loss(cfg, *map(pad_row, (logp, old, adv, mask)))
  more_cols, _ = policy_loss(cfg, *map(pad_col, (logp, old, adv, mask)))
  np.testing.assert_allclose(more_rows, loss * B / (B + 1), rtol=1e-6)
  np.testing.assert_allclose(more_cols, loss / 2, rtol=1e-6)
  dapo_cfg = losses.PolicyLossConfig(name="dapo", clip_eps_high=0.2)  # A token mean: unchanged.
  np.testing.assert_allclose(policy_loss(dapo_cfg, *map(pad_row, (logp, old, adv, mask)))[0],
                             policy_loss(dapo_cfg, logp, old, adv, mask)[0], rtol=1e-6)


def test_dapo_is_ppo_with_clip_higher_and_requires_it():
  logp, old, adv, mask = _batch(4)
  kwargs = {"clip_eps": 0.2, "clip_eps_high": 0.28}
  dapo = policy_loss(losses.PolicyLossConfig(name="dapo", **kwargs), logp, old, adv, mask)
  ppo = policy_loss(losses.PolicyLossConfig(name="ppo", **kwargs), logp, old, adv, mask)
  jax.tree.map(np.testing.assert_array_equal, dapo, ppo)
  with pytest.raises(ValueError, match="dapo.*clip_eps_high"):
    losses.policy_loss(losses.PolicyLossConfig(name="dapo"), logp, old, adv, mask)


def test_cispo_keeps_a_gradient_on_tokens_that_ppo_clips():
  logp, old, adv, mask = _batch(5)
  cfg = dict(clip_eps=0.2, clip_eps_high=0.28)

  def grad(name):
    c = losses.PolicyLossConfig(name=name, **cfg)
    return np.asarray(jax.jit(jax.grad(lambda lp: policy_loss(c, lp, old, adv, mask)[0]))(logp))

  valid = mask > 0
  assert np.all(grad("cispo")[valid] != 0.0)
  assert np.any(grad("ppo")[valid] == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_masked_entries_never_influence_policy_losses(name):
  cfg = losses.PolicyLossConfig(name=name, clip_eps_high=0.28)
  logp, old, adv, mask = _batch(6)
  valid = mask > 0
  dirty = (np.where(valid, logp, -np.inf).astype(np.float32),
           np.where(valid, old, np.nan).astype(np.float32),
           np.where(valid, adv, 1e30).astype(np.float32))
  jax.tree.map(np.testing.assert_array_equal, policy_loss(cfg, logp, old, adv, mask),
               policy_loss(cfg, *dirty, mask))
  grad = jax.jit(jax.grad(lambda lp: policy_loss(cfg, lp, dirty[1], dirty[2], mask)[0]))(dirty[0])
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[~valid] == 0.0)


def test_all_padding_batch_gives_zero_loss():
  logp, old, adv, _ = _batch(7)
  empty = np.zeros((B, T), np.float32)
  for name in NAMES:
    cfg = losses.PolicyLossConfig(name=name, clip_eps_high=0.28)
    loss, aux = policy_loss(cfg, logp, old, adv, empty)
    assert float(loss) == 0.0 and all(np.isfinite(v) for v in jax.tree.leaves(aux)), name


def test_new_hyperparameters_are_validated_and_old_defaults_kept():
  cfg = losses.PolicyLossConfig()
  assert (cfg.clip_eps, cfg.eps_high, cfg.dual_clip_c) == (0.2, 0.2, 3.0)
  assert (cfg.log_clip_eps, cfg.sapo_tau_pos, cfg.sapo_tau_neg) == (0.4, 1.0, 1.05)
  with pytest.raises(ValueError, match="log_clip_eps"):
    losses.PolicyLossConfig(log_clip_eps=-0.1)
  with pytest.raises(ValueError, match="sapo_tau_pos"):
    losses.PolicyLossConfig(sapo_tau_pos=0.0)
  with pytest.raises(ValueError, match="sapo_tau_neg"):
    losses.PolicyLossConfig(sapo_tau_neg=-1.0)


def test_importing_rlhf_jax_registers_the_family():
  # No test imports rlhf_jax.policy_losses itself: only rlhf_jax/__init__.py does.
  assert set(NAMES) <= set(losses.POLICY_LOSSES.names())
