"""DAPO's dynamic sampling against a plain NumPy transcription (which groups are informative,
which rows fill the batch, the counts logged), and in the PPO trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)
from rlhf_jax import dynamic_sampling as ds
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.rollout import Rollout, SamplingConfig
from rlhf_jax.score import Scored
from rlhf_jax.trainers.ppo import PPOTrainerConfig

G = 3


def _numpy_informative(scores, g, tol):
  return np.array([max(scores[i:i + g]) - min(scores[i:i + g]) > tol
                   for i in range(0, len(scores), g)])


def _numpy_fill(batches_scores, g, tol):
  """Row indices into the concatenated batches: kept groups in order, then dropped ones."""
  n = len(batches_scores[0]) // g
  kept, dropped = [], []
  for b, scores in enumerate(batches_scores):
    for j, ok in enumerate(_numpy_informative(scores, g, tol)):
      (kept if ok else dropped).append(b * n + j)
  return [grp * g + i for grp in (kept + dropped)[:n] for i in range(g)]


@pytest.mark.parametrize("scores", [
    [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0 + 1e-9, -1.0, 0.5, 0.5],
    [0.0] * 12,                       # nothing informative
    [float(i) for i in range(12)],    # everything informative
])
def test_informative_groups_match_numpy(scores):
  got = ds.informative_groups(jnp.asarray(scores, jnp.float32), G)
  np.testing.assert_array_equal(got, _numpy_informative(np.float32(scores), G, 1e-6))


def test_group_size_must_divide_the_rows():
  with pytest.raises(ValueError, match="groups of 3"):
    ds.informative_groups(jnp.zeros(7), G)


def _scored(scores, offset):
  """A Scored whose every leaf's row r holds offset + r (so the rows taken can be read back)."""
  b = len(scores)
  rows = jnp.arange(b, dtype=jnp.float32) + offset
  two_d = jnp.tile(rows[:, None], (1, 4))
  ro = Rollout(prompt_ids=two_d.astype(jnp.int32), prompt_mask=jnp.ones((b, 4), jnp.int32),
               completion_ids=two_d.astype(jnp.int32), completion_mask=jnp.ones((b, 4)),
               logprobs=two_d, sampling=SamplingConfig(max_new_tokens=4))
  return Scored(rollout=ro, ref_logprobs=two_d, kl=two_d, raw_scores=rows,
                scores=jnp.asarray(scores, jnp.float32), token_rewards=two_d, values=two_d)


@pytest.mark.parametrize("batches", [
    [[0, 0, 0, 1, 0, 0, 2, 2, 2, 3, 4, 5]],                                  # one batch
    [[0, 0, 0, 1, 0, 0, 2, 2, 2, 3, 4, 5], [7, 7, 7, 1, 2, 3, 9, 9, 9, 0, 0, 1]],   # filled
    [[0] * 12, [1] * 12, [5, 5, 5, 5, 5, 6, 5, 5, 5, 5, 5, 5]],              # runs short
])
def test_fill_batch_takes_kept_groups_first_in_sampling_order(batches):
  scoreds = [_scored(s, 100 * i) for i, s in enumerate(batches)]
  keep = [ds.informative_groups(s.scores, G) for s in scoreds]
  out = jax.jit(ds.fill_batch, static_argnums=2)(scoreds, keep, G)
  want_rows = _numpy_fill([np.float32(s) for s in batches], G, 1e-6)
  all_rows = np.concatenate([np.arange(12) + 100 * i for i in range(len(batches))])
  np.testing.assert_array_equal(out.raw_scores, all_rows[want_rows])
  np.testing.assert_array_equal(out.rollout.completion_ids[:, 0], all_rows[want_rows])
  np.testing.assert_array_equal(out.scores, np.concatenate([np.float32(s) for s in batches])[
      want_rows])
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, scoreds[0])
  m = jax.device_get(ds.fill_metrics(keep))
  n_kept = sum(_numpy_informative(np.float32(s), G, 1e-6).sum() for s in batches)
  assert m["dynamic_sampling/batches"] == len(batches)
  assert m["dynamic_sampling/dropped_groups"] == 4 * len(batches) - n_kept
  assert m["dynamic_sampling/filled_groups"] == max(4 - n_kept, 0)


@pytest.mark.parametrize("kw,msg", [(dict(max_batches=0), "max_batches"),
                                    (dict(tolerance=-1.0), "tolerance")])
def test_bad_config_is_a_clear_error(kw, msg):
  with pytest.raises(ValueError, match=msg):
    ds.DynamicSamplingConfig(**kw)


def _any_five(params, ro):
  """A 0/1 reward, so many groups of 4 score alike: whether the completion holds token 5."""
  del params
  return jnp.any((ro.completion_ids == 5) & (ro.completion_mask > 0), axis=-1).astype(jnp.float32)


def _constant(params, ro):
  del params
  return jnp.zeros(ro.completion_ids.shape[0])


@pytest.mark.parametrize("reward_fn", [_any_five, _constant])
def test_trainer_refills_the_batch_and_logs_the_counts(tmp_path, tokenizer, reward_fn):
  cfg = ds.DynamicSamplingConfig(enabled=True, max_batches=3)
  trainer, writer = tiny_ppo.trainer(
      tokenizer, tmp_path, 3, reward_fn=reward_fn, group_size=4, critic="none",
      advantage=AdvantageConfig(estimator="grpo"), dynamic_sampling=cfg)
  trainer.train()
  writer.close()
  for h in trainer.history:
    batches, dropped = h["dynamic_sampling/batches"], h["dynamic_sampling/dropped_groups"]
    filled = h["dynamic_sampling/filled_groups"]
    assert 1 <= batches <= 3 and 0 <= dropped <= 8 * batches and 0 <= filled <= 8
    # Sampling stops as soon as 8 informative groups are in hand, or at max_batches.
    assert filled == max(0, 8 - (8 * batches - dropped))
    assert batches == 3 or filled == 0
    assert np.isfinite(h["loss"]) and h["nonfinite_steps"] == 0
  if reward_fn is _constant:   # nothing is ever informative: every batch sampled, all refilled
    assert all(h["dynamic_sampling/filled_groups"] == 8 for h in trainer.history)
  else:
    assert any(h["dynamic_sampling/dropped_groups"] > 0 for h in trainer.history)


def test_dynamic_sampling_needs_groups():
  with pytest.raises(ValueError, match="group_size > 1"):
    PPOTrainerConfig(dynamic_sampling=ds.DynamicSamplingConfig(enabled=True))
