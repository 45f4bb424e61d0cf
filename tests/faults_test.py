"""Run-level faults: preemption signals become a flag, runs of non-finite iterations stop the run."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import faults, kl as kl_lib

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)


def test_signals_set_the_flag_and_a_second_sigint_aborts():
  # Python's own Ctrl-C handler as the one to fall back to: a test runner's worker process may
  # have installed another (one that does not raise). raise_signal, unlike os.kill, runs the
  # handler in this thread before it returns, whichever thread the kernel would pick.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with faults.PreemptionHandler() as handler:
      assert not handler.requested()
      signal.raise_signal(signal.SIGTERM)
      assert handler.requested() and handler.signum == signal.SIGTERM
    with faults.PreemptionHandler() as handler:
      signal.raise_signal(signal.SIGINT)   # the first Ctrl-C only asks to stop
      assert handler.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def test_preempted_exit_codes_are_those_of_a_signal_death():
  assert faults.Preempted(5, signal.SIGTERM, "/ckpt").exit_code == 143
  assert faults.Preempted(5, signal.SIGINT, "/ckpt").exit_code == 130
  assert "after step 5" in str(faults.Preempted(5, signal.SIGTERM, "/ckpt"))


def test_guard_counts_consecutive_faulty_iterations_only():
  guard = faults.NonfiniteGuard(max_iterations=3)
  ok, nan, skipped = {"reward_mean": 0.1}, {"reward_mean": float("nan")}, {
      "reward_mean": 0.1, "nonfinite_steps": 2.0}
  for step, record in enumerate([nan, skipped, ok, nan, nan, ok, skipped], start=1):
    guard.update(step, record)
  assert guard.streak == 1
  guard.update(8, nan)
  with pytest.raises(FloatingPointError,
                     match=r"3 consecutive iterations \(steps 7-9\); at step 9: reward_mean=nan"):
    guard.update(9, skipped | {"reward_mean": float("nan")})
  with pytest.raises(ValueError, match="max_nonfinite_iterations must be >= 1"):
    faults.NonfiniteGuard(0)


def _nan_reward(params, ro):
  del params
  return jnp.full(ro.completion_ids.shape[:1], jnp.nan)


def test_trainer_stops_on_a_run_of_nonfinite_rewards_with_params_untouched(tokenizer, tmp_path):
  trainer, _ = tiny_ppo.trainer(
      tokenizer, tmp_path, max_steps=10, reward_fn=_nan_reward, normalize_reward=False,
      max_nonfinite_iterations=2, eval_every=0,
      kl=kl_lib.KLConfig(controller="adaptive"))
  before = jax.device_get(trainer.state.params)
  with pytest.raises(FloatingPointError, match=r"2 consecutive iterations \(steps 1-2\); at step "
                                               r"2: reward_mean=nan, 2 minibatch steps skipped"):
    trainer.train()
  assert [r["step"] for r in trainer.history] == [1, 2]
  assert [r["nonfinite_steps"] for r in trainer.history] == [2.0, 2.0]
  # Every minibatch step was skipped: parameters unchanged, the KL controller still finite.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.state.params))):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(float(trainer.state.kl.coef))
