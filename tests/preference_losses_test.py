"""Each preference loss against a plain NumPy/float64 transcription of its paper's formula (and
TRL's DPOTrainer / CPOTrainer / KTOTrainer where those are the de facto reference), one pair at a
time."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import preference_losses as pl


def _log_sigmoid(z: float) -> float:
  return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _sigmoid(z: float) -> float:
  return math.exp(_log_sigmoid(z))


def reference(cfg: pl.PreferenceLossConfig, x: dict) -> tuple[float, float, float]:
  """(loss, mean chosen reward, mean rejected reward) by a loop over pairs in float64."""
  b, eps = cfg.beta, cfg.label_smoothing
  n = len(x["pc"])
  losses, rc, rr = [], [], []
  z0 = 0.0
  if cfg.name == "kto":
    z0 = max(0.0, sum(float(p) - float(r) for p, r in zip(x["kl"], x["ref_kl"])) / n)
  for i in range(n):
    pc, pr, qc, qr = (float(x[k][i]) for k in ("pc", "pr", "qc", "qr"))
    lc, lr = max(float(x["lc"][i]), 1.0), max(float(x["lr"][i]), 1.0)
    if cfg.name in ("dpo", "cdpo", "robust"):
      h = b * ((pc - qc) - (pr - qr))
      if cfg.name == "robust":
        loss = (-(1 - eps) * _log_sigmoid(h) + eps * _log_sigmoid(-h)) / (1 - 2 * eps)
      else:
        loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
      c, r = b * (pc - qc), b * (pr - qr)
    elif cfg.name == "ipo":
      h = (pc - qc) / lc - (pr - qr) / lr
      loss = (h - 1 / (2 * b)) ** 2
      c, r = b * (pc - qc) / lc, b * (pr - qr) / lr
    elif cfg.name == "simpo":
      c, r = b * pc / lc, b * pr / lr
      loss = -_log_sigmoid(c - r - cfg.simpo_gamma)
    elif cfg.name == "orpo":
      ac, ar = pc / lc, pr / lr
      log_odds = lambda a: a - math.log(1 - math.exp(a))
      loss = -ac - b * _log_sigmoid(log_odds(ac) - log_odds(ar))
      c, r = b * ac, b * ar
    elif cfg.name == "kto":
      loss = 0.5 * (cfg.kto_desirable_weight * (1 - _sigmoid(b * ((pc - qc) - z0)))
                    + cfg.kto_undesirable_weight * (1 - _sigmoid(b * (z0 - (pr - qr)))))
      c, r = b * (pc - qc), b * (pr - qr)
    else:
      raise AssertionError(cfg.name)
    losses.append(loss)
    rc.append(c)
    rr.append(r)
  return sum(losses) / n, sum(rc) / n, sum(rr) / n


def _inputs(seed: int, n: int = 11):
  rng = np.random.default_rng(seed)
  lc, lr = rng.integers(1, 9, n).astype(np.float32), rng.integers(1, 9, n).astype(np.float32)
  # Per-token log-probs in (-3, -0.05), so ORPO's odds stay finite.
  x = {"pc": -rng.uniform(0.05, 3.0, n) * lc, "pr": -rng.uniform(0.05, 3.0, n) * lr,
       "lc": lc, "lr": lr, "kl": -rng.uniform(0.5, 20.0, n), "ref_kl": -rng.uniform(0.5, 20, n)}
  x["qc"] = x["pc"] + rng.normal(0.0, 2.0, n)
  x["qr"] = x["pr"] + rng.normal(0.0, 2.0, n)
  return {k: np.asarray(v, np.float32) for k, v in x.items()}


def _jax_inputs(x, with_kl=True):
  return pl.PreferenceInputs(
      jnp.asarray(x["pc"]), jnp.asarray(x["pr"]), jnp.asarray(x["qc"]), jnp.asarray(x["qr"]),
      jnp.asarray(x["lc"]), jnp.asarray(x["lr"]),
      jnp.asarray(x["kl"]) if with_kl else None, jnp.asarray(x["ref_kl"]) if with_kl else None)


CONFIGS = [
    pl.PreferenceLossConfig("dpo", beta=0.1),
    pl.PreferenceLossConfig("dpo", beta=2.0),
    pl.PreferenceLossConfig("cdpo", beta=0.5, label_smoothing=0.2),
    pl.PreferenceLossConfig("robust", beta=0.5, label_smoothing=0.2),
    pl.PreferenceLossConfig("ipo", beta=0.3),
    pl.PreferenceLossConfig("simpo", beta=2.0, simpo_gamma=0.8),
    pl.PreferenceLossConfig("orpo", beta=0.25),
    pl.PreferenceLossConfig("kto", beta=0.2),
    pl.PreferenceLossConfig("kto", beta=0.5, kto_desirable_weight=1.33, kto_undesirable_weight=0.7),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.beta}")
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_numpy(cfg, seed):
  x = _inputs(seed)
  loss, aux = jax.jit(pl.preference_loss, static_argnums=0)(cfg, _jax_inputs(x))
  want_loss, want_c, want_r = reference(cfg, x)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(aux["chosen_reward"], want_c, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(aux["rejected_reward"], want_r, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(aux["reward_margin"], want_c - want_r, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["chosen_logps"], np.mean(x["pc"].astype(np.float64)), rtol=1e-5)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
  x = _inputs(3)
  x["kl"] = x["ref_kl"] + 1.5                       # KL estimate 1.5
  cfg = pl.PreferenceLossConfig("kto", beta=0.2)
  _, aux = pl.preference_loss(cfg, _jax_inputs(x))
  np.testing.assert_allclose(aux["reference_point"], 1.5, rtol=1e-5)
  x["kl"] = x["ref_kl"] - 1.0                       # a negative estimate counts as 0
  assert float(pl.preference_loss(cfg, _jax_inputs(x))[1]["reference_point"]) == 0.0
  grad = jax.grad(lambda kl: pl.preference_loss(
      cfg, _jax_inputs(x)._replace(kl_logps=kl))[0])(jnp.asarray(x["ref_kl"] + 2.0))
  np.testing.assert_array_equal(grad, 0.0)


def test_reward_accuracy_counts_pairs_ranked_right():
  x = _inputs(4)
  cfg = pl.PreferenceLossConfig("dpo", beta=0.1)
  _, aux = pl.preference_loss(cfg, _jax_inputs(x, with_kl=False))
  want = np.mean((x["pc"] - x["qc"]) > (x["pr"] - x["qr"]))
  np.testing.assert_allclose(aux["reward_accuracy"], want)


def test_dpo_gradient_matches_its_closed_form():
  # d loss / d pi_c = -beta sigma(-h) / n (Rafailov et al. 2023, eq. 8's weight).
  x = _inputs(5)
  cfg = pl.PreferenceLossConfig("dpo", beta=0.4)
  g = jax.grad(lambda pc: pl.preference_loss(cfg, _jax_inputs(x)._replace(chosen_logps=pc))[0])(
      jnp.asarray(x["pc"]))
  h = 0.4 * ((x["pc"] - x["qc"]) - (x["pr"] - x["qr"])).astype(np.float64)
  np.testing.assert_allclose(g, -0.4 / (1 + np.exp(h)) / len(h), rtol=1e-5)


def test_sequence_logps_ignores_padding_values():
  logp = jnp.array([[-1.0, -2.0, jnp.nan, -jnp.inf], [-0.5, -0.5, -0.5, -0.5]])
  mask = jnp.array([[1, 1, 0, 0], [0, 1, 1, 0]])
  total, count = pl.sequence_logps(logp, mask)
  np.testing.assert_allclose(total, [-3.0, -1.0])
  np.testing.assert_allclose(count, [2.0, 2.0])
  g = jax.grad(lambda l: pl.sequence_logps(l, mask)[0].sum())(logp)
  assert np.isfinite(np.asarray(g)).all()


def test_orpo_is_finite_when_a_completion_is_certain():
  x = _inputs(6)
  x["pc"][0] = 0.0
  cfg = pl.PreferenceLossConfig("orpo", beta=0.1)
  loss, grad = jax.value_and_grad(lambda pc: pl.preference_loss(
      cfg, _jax_inputs(x)._replace(chosen_logps=pc))[0])(jnp.asarray(x["pc"]))
  assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()


def test_config_errors():
  with pytest.raises(ValueError, match="label_smoothing is read by the cdpo and robust"):
    pl.PreferenceLossConfig("dpo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="beta must be > 0"):
    pl.PreferenceLossConfig("dpo", beta=0.0)
  with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
    pl.PreferenceLossConfig("robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="unknown preference loss 'nope'; registered: cdpo, dpo"):
    pl.preference_loss(pl.PreferenceLossConfig("nope"), _jax_inputs(_inputs(0)))
  with pytest.raises(ValueError, match="needs kl_logps"):
    pl.preference_loss(pl.PreferenceLossConfig("kto"), _jax_inputs(_inputs(0), with_kl=False))
  assert not pl.PreferenceLossConfig("simpo").needs_reference
  assert pl.PreferenceLossConfig("ipo").needs_reference
