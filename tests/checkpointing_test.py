"""Checkpoints: exact round trip onto shardings, retention, refusal of another run's checkpoint,
and a resumed PPO run that matches an uninterrupted one bitwise."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import checkpointing, models, ppo, sharding
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.trainers.ppo import PPOTrainerConfig

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)


def _state(tokenizer, mesh, hidden=16, seed=0):
  cfg = tiny_ppo.model_cfg(tokenizer, hidden)
  state = ppo.init_train_state(
      ppo.PPOConfig(), models.CausalLM(cfg, rngs=nnx.Rngs(seed)), make_optimizer(OptimConfig()),
      jax.random.key(seed), models.ScalarModel(cfg, rngs=nnx.Rngs(seed + 1)))
  return jax.device_put(state, ppo.train_state_shardings(state, mesh))


def _perturbed(state):
  """A state whose every leaf differs from `state` (so a restore must really read the files)."""
  return jax.tree.map(
      lambda x: jax.random.fold_in(x, 7) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x + jnp.ones_like(x), state)


def _leaves(state):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(state)]


def test_round_trip_is_exact_and_lands_on_the_state_shardings(tokenizer, tmp_path):
  mesh = sharding.make_mesh((2, 2, 2))
  saved = _perturbed(_state(tokenizer, mesh))
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1, keep=2, fingerprint={"a": 1})
  ckpt.save(3, saved, {"note": "x"})
  ckpt.wait()
  fresh = _state(tokenizer, mesh)
  restored, meta = ckpt.restore(fresh)
  assert meta["note"] == "x" and meta["step"] == 3 and meta["fingerprint"] == {"a": 1}
  for a, b in zip(_leaves(saved), _leaves(restored)):
    np.testing.assert_array_equal(a, b)
  for want, got in zip(jax.tree.leaves(fresh), jax.tree.leaves(restored)):
    assert got.sharding == want.sharding
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(saved.rng)
  assert restored.policy_graphdef == fresh.policy_graphdef and restored.tx is fresh.tx
  # Some parameter really is split over devices, so the check above is about placement.
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.params))


def test_periodic_saves_keep_the_newest(tokenizer, tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state = _state(tokenizer, mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=2, keep=2, fingerprint={})
  started = [ckpt.save(s, state, {}) for s in range(1, 8)]
  assert ckpt.save(7, state, {}, force=True)
  ckpt.wait()
  assert started == [False, True, False, True, False, True, False]
  assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7


def test_another_runs_checkpoint_is_refused_by_name(tokenizer, tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1, keep=1, fingerprint={"seed": 0})
  ckpt.save(1, _state(tokenizer, mesh, hidden=16), {})
  ckpt.wait()
  before = sorted(p.name for p in tmp_path.rglob("*"))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/policy/decoder/embed/value is \(\d+, 16\) float32 in the "
                           r"checkpoint but \(\d+, 24\) float32 in this run"):
    ckpt.restore(_state(tokenizer, mesh, hidden=24))
  other = checkpointing.Checkpointer(str(tmp_path), every=1, keep=1, fingerprint={"seed": 1})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="seed=0 in the checkpoint but 1 in this run"):
    other.restore(_state(tokenizer, mesh))
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_fingerprint_ignores_resumable_fields():
  cfg = PPOTrainerConfig(batch_size=8, max_steps=5, optim=OptimConfig(total_steps=5))
  longer = dataclasses.replace(cfg, max_steps=50, optim=OptimConfig(total_steps=50),
                               log_every_s=1.0)
  other = dataclasses.replace(cfg, batch_size=16)
  fp = checkpointing.config_fingerprint(cfg)
  assert fp == checkpointing.config_fingerprint(longer)
  assert checkpointing.fingerprint_mismatches(fp, checkpointing.config_fingerprint(other)) == [
      "batch_size=8 in the checkpoint but 16 in this run"]
  assert fp["policy_loss.clip_eps"] == 0.2
  json.dumps(fp)


def _run(tokenizer, workdir, max_steps):
  """Trains to `max_steps` (resuming from what is in `workdir`) and logs the final evaluation
  like the PPO stage does."""
  trainer, writer = tiny_ppo.trainer(tokenizer, workdir, max_steps)
  final = trainer.train()
  writer.write(int(trainer.state.step), {f"final_{k}": v for k, v in final.items()
                                         if k != "samples"})
  writer.close()
  return trainer, read_jsonl(writer.path)


def test_resumed_run_matches_uninterrupted_run_bitwise(tokenizer, tmp_path):
  straight, want = _run(tokenizer, tmp_path / "a", 4)
  first, _ = _run(tokenizer, tmp_path / "b", 2)
  assert first.checkpointer.all_steps() == [1, 2]
  # A crash after logging step 3 but before its checkpoint: the rerun must drop that record.
  with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "reward_mean": 123.0}) + "\n{\"step\": 4, \"rew")
  resumed, got = _run(tokenizer, tmp_path / "b", 4)
  assert int(resumed.state.step) == 4 and len(resumed.history) == 2
  # The first part's final record and the crashed lines come after its checkpoint: dropped.
  assert [r["step"] for r in got] == [1, 2, 3, 4, 4]
  assert tiny_ppo.without_timing(got) == tiny_ppo.without_timing(want)   # bitwise: floats compared with ==
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)
