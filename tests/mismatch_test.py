"""mismatch: the corrections and metrics against NumPy transcriptions on padded batches, the
sampler vs trainer log-probs of `collect` (~0 in float32), and what the corrections do to a
`ppo_update` (weights scale an SGD step; all-dropped tokens leave the policy unchanged)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import mismatch, models, ppo
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.collect import collect
from rlhf_jax.kl import KLConfig
from rlhf_jax.losses import PolicyLossConfig
from rlhf_jax.rollout import SamplingConfig

# Rows: one valid token, a full row, a padded row, an empty row.
MASK = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
LOG_RHO = np.array([[0.9, 5.0, 5.0, 5.0], [-0.1, 0.2, -1.0, 0.05], [0.3, 0.3, 0.3, 9.0],
                    [7.0, 7.0, 7.0, 7.0]], np.float32)   # garbage on padding


def numpy_weights(name, cfg, log_rho, mask):
  """Plain loops over tokens and rows."""
  w = np.zeros_like(log_rho, np.float64)
  for i in range(log_rho.shape[0]):
    valid = [t for t in range(log_rho.shape[1]) if mask[i, t]]
    geo = np.exp(np.mean([log_rho[i, t] for t in valid])) if valid else 1.0
    for t in valid:
      rho = np.exp(np.float64(log_rho[i, t]))
      w[i, t] = {"none": 1.0, "tis": min(rho, cfg.tis_cap),
                 "icepop": float(cfg.icepop_low <= rho <= cfg.icepop_high),
                 "seq_mask": float(1 / cfg.seq_mask_threshold <= geo <= cfg.seq_mask_threshold)
                 }[name]
  return w


@pytest.mark.parametrize("name", ["none", "tis", "icepop", "seq_mask"])
@pytest.mark.parametrize("cfg", [mismatch.MismatchConfig(),
                                 mismatch.MismatchConfig(tis_cap=1.5, icepop_low=0.8,
                                                         icepop_high=1.3,
                                                         seq_mask_threshold=1.2)])
def test_corrections_match_numpy(name, cfg):
  cfg = dataclasses.replace(cfg, correction=name)
  sampler = np.full_like(LOG_RHO, -1.0)
  got = jax.jit(mismatch.correction_weights, static_argnums=0)(
      cfg, jnp.asarray(sampler + LOG_RHO), jnp.asarray(sampler), jnp.asarray(MASK))
  np.testing.assert_allclose(got, numpy_weights(name, cfg, LOG_RHO, MASK), rtol=1e-5, atol=1e-6)


def test_metrics_match_numpy():
  got = mismatch.mismatch_metrics(jnp.asarray(LOG_RHO), jnp.zeros_like(LOG_RHO), MASK)
  valid = LOG_RHO[MASK > 0]
  np.testing.assert_allclose(got["mismatch/abs_logp_diff"], np.abs(valid).mean(), rtol=1e-6)
  np.testing.assert_allclose(got["mismatch/max_ratio"], np.exp(valid.max()), rtol=1e-6)
  np.testing.assert_allclose(got["mismatch/min_ratio"], np.exp(valid.min()), rtol=1e-6)
  none = mismatch.mismatch_metrics(jnp.asarray(LOG_RHO), jnp.zeros_like(LOG_RHO), 0 * MASK)
  assert float(none["mismatch/max_ratio"]) == 1.0 == float(none["mismatch/min_ratio"])


def test_bad_configs_are_refused():
  for kwargs, match in (({"correction": "nosuch"}, "unknown mismatch correction 'nosuch'"),
                        ({"tis_cap": 0.0}, "tis_cap"), ({"icepop_low": 1.5}, "icepop"),
                        ({"seq_mask_threshold": 0.5}, "seq_mask_threshold")):
    with pytest.raises(ValueError, match=match):
      mismatch.MismatchConfig(**kwargs)


VOCAB, EOS, PAD = 24, 2, 0
CFG = models.DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, num_layers=1,
                           num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32)


def reward(params, ro):
  del params
  return (ro.completion_ids * ro.completion_mask).sum(-1) / 10.0   # spread within every group


@functools.cache
def _scored(pcfg):
  """A collected batch of 8 rows and the initial state's parameters."""
  policy = models.CausalLM(CFG, rngs=nnx.Rngs(0))
  ref_graphdef, ref_params = nnx.split(policy)
  ref_params = jax.tree.map(jnp.copy, ref_params)
  state = ppo.init_train_state(pcfg, policy, optax.sgd(0.5), jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (8, 3)), jnp.int32)
  scored, metrics = jax.jit(functools.partial(collect, pcfg, ref_graphdef=ref_graphdef,
                                              reward_fn=reward))(
      state, ids, jnp.ones_like(ids), jax.random.key(1), ref_params=ref_params,
      reward_params=None)
  return state, scored, jax.device_get(metrics)


def _pcfg(**mm):
  return ppo.PPOConfig(
      sampling=SamplingConfig(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD),
      group_size=4, critic="none", advantage=AdvantageConfig(estimator="dr_grpo"),
      policy_loss=PolicyLossConfig(name="reinforce"), kl=KLConfig(init_coef=0.0),
      ppo_epochs=1, whiten_advantages=False, mismatch=mismatch.MismatchConfig(**mm))


def _delta(pcfg, scored):
  state, _, _ = _scored(_pcfg())
  before = jax.tree.map(np.asarray, state.params["policy"])
  new, metrics = jax.jit(ppo.ppo_update, static_argnums=0)(pcfg, state, scored)
  delta = jax.tree.map(lambda a, b: np.asarray(a) - b, new.params["policy"], before)
  return np.concatenate([x.ravel() for x in jax.tree.leaves(delta)]), jax.device_get(metrics)


def test_collect_logs_sampler_vs_trainer_mismatch_near_zero_in_float32():
  _, plain, plain_metrics = _scored(_pcfg())
  assert plain.trainer_logprobs is None and "mismatch/abs_logp_diff" not in plain_metrics
  _, scored, metrics = _scored(_pcfg(log_metrics=True))
  mask = np.asarray(scored.rollout.completion_mask)
  assert mask.sum() > 8
  diff = np.abs(np.asarray(scored.trainer_logprobs) - np.asarray(scored.rollout.logprobs))
  assert diff.max() < 1e-4
  assert metrics["mismatch/abs_logp_diff"] < 1e-5
  assert abs(metrics["mismatch/max_ratio"] - 1) < 1e-4
  assert abs(metrics["mismatch/min_ratio"] - 1) < 1e-4


def test_corrections_weight_the_update():
  _, scored, _ = _scored(_pcfg())
  base, _ = _delta(_pcfg(), scored)
  assert np.abs(base).max() > 0
  # The trainer's log-probs 0.5 nats below the sampler's: rho = e^-0.5 on every token.
  shifted = scored.replace(trainer_logprobs=scored.rollout.logprobs - 0.5)
  tis, m = _delta(_pcfg(correction="tis"), shifted)
  np.testing.assert_allclose(tis, np.exp(-0.5) * base, rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(m["mismatch/weight_mean"], np.exp(-0.5), rtol=1e-5)
  for name, kwargs in (("icepop", {"icepop_low": 0.7}), ("seq_mask", {"seq_mask_threshold": 1.5})):
    dropped, m = _delta(_pcfg(correction=name, **kwargs), shifted)
    assert np.abs(dropped).max() == 0.0 and m["mismatch/weight_mean"] == 0.0, name
    kept, _ = _delta(_pcfg(correction=name), shifted)   # defaults keep rho = 0.61 in band
    np.testing.assert_allclose(kept, base, rtol=1e-5, atol=1e-7)


def test_recompute_uses_the_trainers_logprobs_as_pi_old():
  _, scored, _ = _scored(_pcfg())
  # reinforce's loss is -A exp(logp - old): shifting pi_old by -0.5 scales the gradient by e^0.5.
  shifted = scored.replace(trainer_logprobs=scored.rollout.logprobs - 0.5)
  base, _ = _delta(_pcfg(), scored)
  recomputed, _ = _delta(_pcfg(recompute_logprobs=True), shifted)
  np.testing.assert_allclose(recomputed, np.exp(0.5) * base, rtol=2e-3, atol=1e-7)
