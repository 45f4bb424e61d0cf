"""SIGTERM during the PPO stage: the iteration in flight finishes, a final checkpoint is written,
the process exits with 143, and rerunning the same command resumes and matches an uninterrupted
run."""

import signal

import tiny_ppo

MAX_STEPS = 16


def test_sigterm_checkpoints_exits_143_and_the_rerun_finishes_like_an_uninterrupted_run(
    tmp_path, tmp_path_factory):
  overrides = {**tiny_ppo.write_inputs(tmp_path), **tiny_ppo.ppo_overrides(MAX_STEPS)}
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  ref = tiny_ppo.run(str(tmp_path / "ref"), overrides, cache)
  assert ref.returncode == 0, ref.stderr[-2000:]

  work, log = str(tmp_path / "w"), str(tmp_path / "w.log")
  proc = tiny_ppo.start(work, overrides, cache, log)
  tiny_ppo.wait_for(lambda: tiny_ppo.checkpoint_steps(work), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  with open(log) as f:
    last_line = f.read().strip().splitlines()[-1]
  assert last_line.startswith("preempted by SIGTERM: stopped after step ")
  stopped = int(last_line.split("after step ")[1].split(",")[0])
  assert stopped < MAX_STEPS
  assert max(tiny_ppo.checkpoint_steps(work)) == stopped
  assert not tiny_ppo.save_in_flight(work)
  assert [r["step"] for r in tiny_ppo.stage_metrics(work)] == list(range(1, stopped + 1))

  rerun = tiny_ppo.run(work, overrides, cache)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resuming PPO from step {stopped}" in rerun.stderr
  assert tiny_ppo.stage_metrics(work) == tiny_ppo.stage_metrics(str(tmp_path / "ref"))
