"""kill -9 at random moments of the PPO stage, half of them while a checkpoint is being written:
every restart resumes from the newest complete checkpoint, and the final metrics equal those of
an uninterrupted run."""

import random
import re
import time

import tiny_ppo

MAX_STEPS = 30
KILLS = 6


def test_six_kills_then_resume_match_the_uninterrupted_run(tmp_path, tmp_path_factory):
  overrides = {**tiny_ppo.write_inputs(tmp_path),
               **tiny_ppo.ppo_overrides(MAX_STEPS, **{"ppo.eval_every": 5})}
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  ref = tiny_ppo.run(str(tmp_path / "ref"), overrides, cache)
  assert ref.returncode == 0, ref.stderr[-2000:]

  rng = random.Random(0)
  work = str(tmp_path / "w")
  killed_mid_save = 0
  for i in range(KILLS):
    newest = max(tiny_ppo.checkpoint_steps(work), default=0)
    log = str(tmp_path / f"run{i}.log")
    proc = tiny_ppo.start(work, overrides, cache, log)
    # Progress first (a checkpoint newer than the one resumed from), then the kill: on even
    # rounds as soon as the next save is in flight, on odd rounds after a random delay.
    tiny_ppo.wait_for(lambda: max(tiny_ppo.checkpoint_steps(work), default=0) > newest, proc)
    if i % 2 == 0:
      tiny_ppo.wait_for(lambda: tiny_ppo.save_in_flight(work), proc, poll_s=0.002)
    else:
      time.sleep(rng.uniform(0.0, 0.5))
    killed_mid_save += tiny_ppo.save_in_flight(work)
    proc.kill()
    proc.wait()
    with open(log) as f:
      resumed = re.findall(r"resuming PPO from step (\d+)", f.read())
    assert resumed == ([str(newest)] if newest else []), (i, newest, resumed)
  assert killed_mid_save >= KILLS // 2
  newest = max(tiny_ppo.checkpoint_steps(work))
  assert newest < MAX_STEPS

  final = tiny_ppo.run(work, overrides, cache)
  assert final.returncode == 0, final.stderr[-2000:]
  assert f"resuming PPO from step {newest}" in final.stderr
  assert tiny_ppo.stage_metrics(work) == tiny_ppo.stage_metrics(str(tmp_path / "ref"))
