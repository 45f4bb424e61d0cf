"""The supervised loop's checkpoints and non-finite guard (`trainers.supervised.fit`,
`trainers.resume`): a preempted fit resumes bitwise, non-finite steps are skipped and counted and
a run of them stops the loop, and an unreadable newest checkpoint falls back to the previous."""

import dataclasses
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import checkpointing, data, faults, models, optim
from rlhf_jax.data import batching
from rlhf_jax.metrics import MetricsWriter, read_jsonl
from rlhf_jax.trainers import sft
from rlhf_jax.trainers import supervised as trainers

import tiny_ppo

STEPS = 6   # 48 rows / batch 8, one epoch


def _setup(tok_dir, **cfg):
  examples = data.make_default_task(seed=0, n_sft=48, n_pairs=0, n_prompts=0,
                                    n_eval_prompts=8).sft
  cfg = sft.SFTConfig(**{**dict(batch_size=8, max_len=12, eval_fraction=0.0, log_every=1,
                                checkpoint_every=2, optim=optim.OptimConfig(learning_rate=1e-2)),
                         **cfg})
  tok = data.build_tokenizer(data.vocabulary(), str(tok_dir))
  model = models.CausalLM(tiny_ppo.model_cfg(tok), rngs=nnx.Rngs(0))
  train = sft.encode_examples(tok, examples, cfg)
  graphdef, params = nnx.split(model)
  return cfg, graphdef, params, train


def _fit(setup, workdir, log_fn=None, loss_fn=sft.sft_batch_loss):
  cfg, graphdef, params, train = setup
  writer = MetricsWriter(str(workdir), tensorboard=False)

  def log(step, m):
    writer.write(step, m)
    if log_fn is not None:
      log_fn(step)
  try:
    out, history = trainers.fit(cfg, graphdef, params, loss_fn, train, log_fn=log,
                                count_fn=sft.sft_batch_targets,
                                checkpoint_dir=str(workdir / "ckpt"), writer=writer)
  finally:
    writer.close()
  return jax.device_get(out), history


def _no_timing(records):
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.fixture
def tok_dir(tmp_path):
  return tmp_path / "tok"


def test_a_preempted_fit_resumes_bitwise(tmp_path, tok_dir):
  setup = _setup(tok_dir)
  want, want_history = _fit(setup, tmp_path / "ref")

  def sigterm_at_3(step):
    if step == 3:
      signal.raise_signal(signal.SIGTERM)
  with pytest.raises(faults.Preempted, match="stopped after step 3") as stopped:
    _fit(setup, tmp_path / "w", sigterm_at_3)
  assert stopped.value.exit_code == 143
  assert checkpointing.Checkpointer(str(tmp_path / "w" / "ckpt"), every=1, keep=2,
                                    fingerprint={}).all_steps() == [2, 3]
  got, history = _fit(setup, tmp_path / "w")
  assert [h["step"] for h in history] == [4, 5, 6]
  assert _no_timing(history) == _no_timing(want_history[3:])
  jax.tree.map(np.testing.assert_array_equal, want, got)
  # The resumed run's records continue the preempted one's: each step once, as uninterrupted.
  assert (_no_timing(read_jsonl(str(tmp_path / "w" / "metrics.jsonl")))
          == _no_timing(read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))))
  # Resumed after the last step: nothing runs, the checkpoint's last entry comes back.
  again, last = _fit(setup, tmp_path / "w")
  assert _no_timing(last) == _no_timing(want_history[-1:])
  jax.tree.map(np.testing.assert_array_equal, want, again)


def test_another_configs_checkpoint_is_refused(tmp_path, tok_dir):
  _fit(_setup(tok_dir), tmp_path)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="optim.learning_rate"):
    _fit(_setup(tok_dir, optim=optim.OptimConfig(learning_rate=2e-2)), tmp_path)
  # Cadences may change between a save and its resumption.
  _fit(_setup(tok_dir, checkpoint_every=3, log_every=2), tmp_path)


def _poisoned(loss_fn):
  """`loss_fn` whose loss is NaN on batches holding a row marked in "poison"."""
  def wrapped(model, batch):
    loss, aux = loss_fn(model, batch)
    return jnp.where(batch["poison"].any(), jnp.nan, loss), aux
  return wrapped


def test_a_nonfinite_step_leaves_params_and_optimizer_state_unchanged(tok_dir):
  cfg, graphdef, params, train = _setup(tok_dir)
  tx = optim.make_optimizer(cfg.optim)
  step = jax.jit(trainers.make_train_step(_poisoned(sft.sft_batch_loss), graphdef, tx))
  opt_state = tx.init(params)
  batch = trainers.take_rows(dict(train, poison=np.ones(48, np.int32)), np.arange(8))
  new_params, new_opt_state, metrics = step(params, opt_state, batch)
  assert metrics["nonfinite_steps"] == 1.0 and not np.isfinite(metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, (params, opt_state), (new_params, new_opt_state))
  _, _, metrics = step(params, opt_state, dict(batch, poison=np.zeros(8, np.int32)))
  assert metrics["nonfinite_steps"] == 0.0


def test_nonfinite_steps_are_skipped_counted_and_a_run_of_them_stops(tmp_path, tok_dir):
  cfg, graphdef, params, train = _setup(tok_dir, checkpoint_every=0)
  batches = batching.epoch_batches(trainers.num_rows(train), cfg.batch_size, cfg.seed, 0)
  bad_step = 3
  poison = np.zeros(trainers.num_rows(train), np.int32)
  poison[batches[bad_step - 1][0]] = 1
  got, history = _fit((cfg, graphdef, params, dict(train, poison=poison)), tmp_path / "bad",
                      loss_fn=_poisoned(sft.sft_batch_loss))
  assert [h["nonfinite_steps"] for h in history] == [float(s == bad_step)
                                                     for s in range(1, STEPS + 1)]
  assert [h["nonfinite_steps_total"] for h in history] == [0, 0, 1, 1, 1, 1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(got))
  logged = read_jsonl(str(tmp_path / "bad" / "metrics.jsonl"))
  assert logged[-1]["nonfinite_steps_total"] == 1

  every_batch = np.ones(trainers.num_rows(train), np.int32)
  stop_at_2 = dataclasses.replace(cfg, max_nonfinite_steps=2)
  with pytest.raises(FloatingPointError, match=r"2 consecutive steps \(steps 1-2\); at step 2"):
    _fit((stop_at_2, graphdef, params, dict(train, poison=every_batch)), tmp_path / "stop",
         loss_fn=_poisoned(sft.sft_batch_loss))


def test_a_diverging_run_stops_instead_of_finishing(tmp_path, tok_dir):
  # A NaN learning rate is refused up front (OptimConfig); one of 1e30 passes every check and
  # blows the weights up at the first step, so every later loss is non-finite.
  setup = _setup(tok_dir, optim=optim.OptimConfig(learning_rate=1e30), checkpoint_every=0)
  with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(steps 2-4\)"):
    _fit(setup, tmp_path)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, tok_dir):
  setup = _setup(tok_dir, checkpoint_every=1, keep_checkpoints=3)
  cut = STEPS - 1

  def stop(step):
    if step == cut:
      signal.raise_signal(signal.SIGTERM)
  with pytest.raises(faults.Preempted):
    _fit(setup, tmp_path / "w", stop)
  want, _ = _fit(setup, tmp_path / "ref")
  ckpt = tmp_path / "w" / "ckpt"
  os.remove(ckpt / str(cut) / "meta" / "metadata")   # lost after the rename, e.g. a bad copy
  shutil.rmtree(ckpt / str(cut - 1) / "state")
  got, history = _fit(setup, tmp_path / "w")
  assert history[0]["step"] == cut - 1   # resumed from step cut - 2, the newest readable
  assert {f"{cut - 1}.incomplete", f"{cut}.incomplete"} <= set(os.listdir(ckpt))   # kept
  jax.tree.map(np.testing.assert_array_equal, want, got)
