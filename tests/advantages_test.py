"""Tests for rlhf_jax.advantages against plain Python loop transcriptions."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages as adv_lib
from rlhf_jax.registry import UnknownNameError

LENGTHS = (7, 3, 0, 5, 1, 6)  # Right-padded completions: one full, one empty.
B, T = len(LENGTHS), 7

compute = jax.jit(adv_lib.compute_advantages, static_argnums=0)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
  rewards = rng.normal(0.0, 0.1, (B, T)).astype(np.float32)  # E.g. -beta * KL per token.
  for b, n in enumerate(LENGTHS):
    if n:
      rewards[b, n - 1] += rng.normal(0.0, 2.0)  # The score at the last token.
  values = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
  return rewards, values, mask


def _valid_next(mask, b, t):
  return t + 1 < mask.shape[1] and mask[b, t + 1] > 0


def gae_reference(rewards, values, mask, gamma, lam):
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        continue
      nxt = _valid_next(mask, b, t)
      next_value = float(values[b, t + 1]) if nxt else 0.0
      next_adv = adv[b, t + 1] if nxt else 0.0
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      adv[b, t] = delta + gamma * lam * next_adv
  returns = np.where(mask > 0, adv + values, 0.0)
  return adv, returns


def returns_to_go_reference(rewards, mask, gamma):
  ret = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t]:
        bootstrap = gamma * ret[b, t + 1] if _valid_next(mask, b, t) else 0.0
        ret[b, t] = float(rewards[b, t]) + bootstrap
  return ret


def sequence_returns_reference(rewards, mask):
  return [sum(float(rewards[b, t]) for t in range(rewards.shape[1]) if mask[b, t])
          for b in range(rewards.shape[0])]


def broadcast_reference(per_sequence, mask):
  return np.array([[per_sequence[b] if mask[b, t] else 0.0 for t in range(mask.shape[1])]
                   for b in range(mask.shape[0])])


def grpo_reference(rewards, mask, group_size, eps):
  seq = sequence_returns_reference(rewards, mask)
  out = []
  for i, r in enumerate(seq):
    group = seq[(i // group_size) * group_size:(i // group_size + 1) * group_size]
    out.append((r - statistics.mean(group)) / (statistics.stdev(group) + eps))
  return broadcast_reference(out, mask)


def rloo_reference(rewards, mask, group_size):
  seq = sequence_returns_reference(rewards, mask)
  out = []
  for i, r in enumerate(seq):
    g = i // group_size
    others = [seq[j] for j in range(g * group_size, (g + 1) * group_size) if j != i]
    out.append(r - sum(others) / len(others))
  return broadcast_reference(out, mask)


def dr_grpo_reference(rewards, mask, group_size):
  seq = sequence_returns_reference(rewards, mask)
  out = []
  for i, r in enumerate(seq):
    g = i // group_size
    out.append(r - statistics.mean(seq[g * group_size:(g + 1) * group_size]))
  return broadcast_reference(out, mask)


def reinforce_pp_baseline_reference(rewards, mask, group_size, gamma):
  seq = sequence_returns_reference(rewards, mask)
  shaped = rewards.astype(np.float64).copy()
  for i in range(rewards.shape[0]):
    valid_t = [t for t in range(rewards.shape[1]) if mask[i, t]]
    if valid_t:
      g = i // group_size
      shaped[i, valid_t[-1]] -= statistics.mean(seq[g * group_size:(g + 1) * group_size])
  returns = returns_to_go_reference(shaped, mask, gamma)
  flat = returns[mask > 0]
  adv = np.where(mask > 0, (returns - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8), 0.0)
  return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_loop(gamma, lam):
  rewards, values, mask = _batch()
  cfg = adv_lib.AdvantageConfig("gae", gamma=gamma, lam=lam)
  adv, ret = compute(cfg, adv_lib.AdvantageInputs(rewards, values, mask))
  ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)


def test_gae_mask_with_hole_cuts_bootstrap():
  rewards, values, _ = _batch(1)
  mask = np.ones((B, T), np.float32)
  mask[:, 3] = 0.0
  adv, ret = adv_lib.generalized_advantage_estimation(rewards, values, mask, 0.99, 0.9)
  ref_adv, ref_ret = gae_reference(rewards, values, mask, 0.99, 0.9)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)


def test_gae_lambda1_is_monte_carlo_minus_value():
  rewards, values, mask = _batch(2)
  adv, _ = adv_lib.generalized_advantage_estimation(rewards, values, mask, 1.0, 1.0)
  expected = np.where(mask > 0, returns_to_go_reference(rewards, mask, 1.0) - values, 0.0)
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [2, 3])
def test_grpo_matches_loop(group_size):
  rewards, _, mask = _batch(3)
  cfg = adv_lib.AdvantageConfig("grpo", eps=1e-6)
  adv, ret = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, group_size))
  np.testing.assert_allclose(adv, grpo_reference(rewards, mask, group_size, 1e-6), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(ret, adv)


def test_grpo_equal_rewards_give_zero_advantage():
  mask = np.ones((4, 3), np.float32)
  rewards = np.zeros((4, 3), np.float32)
  rewards[:, -1] = 1.0
  cfg = adv_lib.AdvantageConfig("grpo")
  adv, _ = adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, None, mask, 4))
  np.testing.assert_array_equal(adv, 0.0)


@pytest.mark.parametrize("group_size", [2, 3])
def test_rloo_matches_loop(group_size):
  rewards, _, mask = _batch(4)
  cfg = adv_lib.AdvantageConfig("rloo")
  adv, ret = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, group_size))
  np.testing.assert_allclose(adv, rloo_reference(rewards, mask, group_size), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ret, adv)


@pytest.mark.parametrize("group_size", [2, 3])
def test_dr_grpo_matches_loop(group_size):
  rewards, _, mask = _batch(9)
  cfg = adv_lib.AdvantageConfig("dr_grpo")
  adv, ret = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, group_size))
  np.testing.assert_allclose(adv, dr_grpo_reference(rewards, mask, group_size), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(ret, adv)
  # No std division: scaling the rewards scales the advantages (GRPO's would not change).
  scaled, _ = compute(cfg, adv_lib.AdvantageInputs(3.0 * rewards, None, mask, group_size))
  np.testing.assert_allclose(scaled, 3.0 * np.asarray(adv), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_all_equal_group_gives_zero_advantage_with_two_groups(estimator):
  mask = (np.arange(4)[None, :] < np.array([4, 1, 2, 3])[:, None]).astype(np.float32)
  rewards = np.zeros((4, 4), np.float32)
  rewards[[0, 1], [3, 0]] = 1.0  # Group 0: both completions return 1.
  rewards[[2, 3], [1, 2]] = [0.0, 2.0]  # Group 1: returns 0 and 2.
  adv, _ = compute(adv_lib.AdvantageConfig(estimator), adv_lib.AdvantageInputs(rewards, None,
                                                                              mask, 2))
  np.testing.assert_array_equal(np.asarray(adv)[:2], 0.0)
  assert np.all(np.asarray(adv)[2][mask[2] > 0] < 0) and np.all(np.asarray(adv)[3][mask[3] > 0] > 0)


def remax_reference(rewards, mask, baselines):
  seq = sequence_returns_reference(rewards, mask)
  return broadcast_reference([r - float(b) for r, b in zip(seq, baselines, strict=True)], mask)


@pytest.mark.parametrize("group_size", [1, 2])
def test_remax_matches_loop(group_size):
  rewards, _, mask = _batch(10)
  rng = np.random.default_rng(11)
  # One greedy completion per prompt: its return repeats over the prompt's group of samples.
  baselines = np.repeat(rng.normal(0.0, 2.0, B // group_size), group_size).astype(np.float32)
  cfg = adv_lib.AdvantageConfig("remax")
  adv, ret = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, group_size, baselines))
  np.testing.assert_allclose(adv, remax_reference(rewards, mask, baselines), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(ret, adv)


def test_remax_greedy_as_good_as_sample_gives_zero_and_padding_is_inert():
  rewards, _, mask = _batch(12)
  returns = np.array(sequence_returns_reference(rewards, mask), np.float32)
  cfg = adv_lib.AdvantageConfig("remax")
  adv, _ = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, baselines=returns))
  np.testing.assert_allclose(adv, 0.0, atol=1e-6)
  baselines = returns - 1.0
  clean, _ = compute(cfg, adv_lib.AdvantageInputs(rewards, None, mask, baselines=baselines))
  empty = np.array(LENGTHS) == 0
  dirty, _ = compute(cfg, adv_lib.AdvantageInputs(
      np.where(mask > 0, rewards, np.float32(np.nan)), None, mask,
      baselines=np.where(empty, np.float32(np.nan), baselines)))  # An empty row's baseline.
  np.testing.assert_array_equal(clean, dirty)
  np.testing.assert_allclose(clean, np.where(mask > 0, 1.0, 0.0), rtol=1e-5)


def test_remax_needs_baselines_of_shape_b():
  rewards, _, mask = _batch()
  cfg = adv_lib.AdvantageConfig("remax")
  with pytest.raises(ValueError, match="needs AdvantageInputs.baselines"):
    adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, None, mask))
  with pytest.raises(AssertionError):
    adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, None, mask,
                                                            baselines=np.zeros((B, 1))))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_baseline_matches_loop(gamma):
  rewards, _, mask = _batch(5)
  cfg = adv_lib.AdvantageConfig("reinforce_pp_baseline", gamma=gamma)
  adv, ret = adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, None, mask, 3))
  ref_adv, ref_ret = reinforce_pp_baseline_reference(rewards, mask, 3, gamma)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_matches_loop(gamma):
  rewards, _, mask = _batch(6)
  cfg = adv_lib.AdvantageConfig("reinforce", gamma=gamma)
  adv, ret = adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, None, mask))
  np.testing.assert_allclose(adv, returns_to_go_reference(rewards, mask, gamma), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(ret, adv)
  np.testing.assert_allclose(adv_lib.discounted_returns(rewards, mask, gamma), adv, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline",
                                       "reinforce"])
def test_masked_entries_never_influence_results(estimator):
  rewards, values, mask = _batch(7)
  cfg = adv_lib.AdvantageConfig(estimator, gamma=0.95)
  clean = adv_lib.compute_advantages(cfg, adv_lib.AdvantageInputs(rewards, values, mask, 3))
  garbage_rewards = np.where(mask > 0, rewards, np.float32(np.nan))
  garbage_values = np.where(mask > 0, values, np.float32(1e30))
  dirty = adv_lib.compute_advantages(
      cfg, adv_lib.AdvantageInputs(garbage_rewards, garbage_values, mask.astype(bool), 3))
  for c, d in zip(clean, dirty, strict=True):
    np.testing.assert_array_equal(c, d)
    assert c.dtype == jnp.float32
    assert np.all(np.asarray(c)[mask == 0] == 0.0)
    assert np.all(np.isfinite(c))


def test_group_size_must_divide_batch():
  rewards, _, mask = _batch()
  with pytest.raises(ValueError, match="group_size 4 must divide the batch size 6"):
    adv_lib.compute_advantages(adv_lib.AdvantageConfig("grpo"),
                               adv_lib.AdvantageInputs(rewards, None, mask, 4))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_need_two_completions(estimator):
  rewards, _, mask = _batch()
  with pytest.raises(ValueError, match="needs group_size >= 2"):
    adv_lib.compute_advantages(adv_lib.AdvantageConfig(estimator),
                               adv_lib.AdvantageInputs(rewards, None, mask))


def test_gae_needs_values_and_unknown_estimator_lists_names():
  rewards, _, mask = _batch()
  with pytest.raises(ValueError, match="needs AdvantageInputs.values"):
    adv_lib.compute_advantages(adv_lib.AdvantageConfig("gae"),
                               adv_lib.AdvantageInputs(rewards, None, mask))
  with pytest.raises(UnknownNameError, match="registered: .*gae, grpo"):
    adv_lib.compute_advantages(adv_lib.AdvantageConfig("vtrace"),
                               adv_lib.AdvantageInputs(rewards, None, mask))
  with pytest.raises(ValueError, match="lam"):
    adv_lib.AdvantageConfig(lam=1.5)


def test_registered_estimator_is_selectable_by_name():
  @adv_lib.register_advantage_estimator("test_only_sequence_return")
  def sequence_return(cfg, inputs):
    del cfg
    seq = jnp.sum(jnp.where(inputs.mask > 0, inputs.token_rewards, 0.0), axis=1, keepdims=True)
    adv = jnp.where(inputs.mask > 0, seq, 0.0)
    return adv, adv

  rewards, _, mask = _batch(8)
  adv, _ = compute(adv_lib.AdvantageConfig("test_only_sequence_return"),
                   adv_lib.AdvantageInputs(rewards, None, mask))
  expected = broadcast_reference(sequence_returns_reference(rewards, mask), mask)
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
