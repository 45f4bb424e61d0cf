"""kill -9 during SFT and during reward-model training: each rerun of the same command resumes the
stage from its newest complete checkpoint, and the finished run's metrics and exported models equal
those of an uninterrupted run, byte for byte."""

import os
import re
import subprocess
import sys

from rlhf_jax.metrics import read_jsonl

import tiny_ppo

OVERRIDES = {"ppo.max_steps": 1, "ppo.eval_every": 0, "sft.checkpoint_every": 2,
             "reward.checkpoint_every": 2, "sft.log_every": 1, "reward.log_every": 1}
MODELS = ("sft/model.safetensors", "reward/model.safetensors", "ppo/policy/model.safetensors")


def _run(workdir: str, cache: str, log: str, kill: tuple[str, int] | None = None) -> int:
  env = tiny_ppo.env(cache)
  if kill is not None:
    env.update(KILL_STAGE=kill[0], KILL_STEP=str(kill[1]))
  cmd = [sys.executable, os.path.join("tests", "kill_at_step.py"), f"--workdir={workdir}",
         "--config=experiments/configs/default.py:smoke",
         *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  with open(log, "w") as f:
    return subprocess.run(cmd, cwd=tiny_ppo.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                          timeout=600).returncode


def _resumed(log: str, stage: str) -> list[int]:
  with open(log) as f:
    return [int(s) for s in re.findall(rf"resuming from checkpoint \S+/{stage}/checkpoints/(\d+)",
                                       f.read())]


def _outputs(workdir: str) -> dict:
  out = {s: tiny_ppo.without_timing(read_jsonl(os.path.join(workdir, s, "metrics.jsonl")))
         for s in ("sft", "reward", "ppo")}
  for name in MODELS:
    with open(os.path.join(workdir, name), "rb") as f:
      out[name] = f.read()
  return out


def test_kill_9_in_sft_and_in_reward_training_resume_to_the_uninterrupted_result(
    tmp_path, tmp_path_factory):
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  ref, work = str(tmp_path / "ref"), str(tmp_path / "w")
  assert _run(ref, cache, str(tmp_path / "ref.log")) == 0

  assert _run(work, cache, str(tmp_path / "1.log"), kill=("sft", 5)) == -9
  assert _run(work, cache, str(tmp_path / "2.log"), kill=("reward", 5)) == -9
  resumed_sft = _resumed(str(tmp_path / "2.log"), "sft")
  assert len(resumed_sft) == 1 and resumed_sft[0] in (2, 4)
  assert _run(work, cache, str(tmp_path / "3.log")) == 0
  with open(tmp_path / "3.log") as f:
    assert "sft: finished in" in f.read()
  resumed_rm = _resumed(str(tmp_path / "3.log"), "reward")
  assert len(resumed_rm) == 1 and resumed_rm[0] in (2, 4)
  assert _outputs(work) == _outputs(ref)
