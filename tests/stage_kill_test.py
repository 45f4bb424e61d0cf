"""kill -9 during SFT, reward-model and DPO training (the stage mains, `experiments.sft`,
`experiments.reward_model` and `experiments.dpo`): each rerun of the same command resumes the stage from its newest
complete checkpoint, and the finished stages' metrics and exported models equal those of an
uninterrupted run, byte for byte."""

import os
import re
import subprocess
import sys

from rlhf_jax.metrics import read_jsonl

import tiny_ppo

STAGES = ("sft", "reward", "dpo")
OVERRIDES = {f"{s}.{k}": v for s in STAGES for k, v in (("checkpoint_every", 2), ("log_every", 1))}
MAINS = {"sft": "experiments.sft", "reward": "experiments.reward_model", "dpo": "experiments.dpo"}


def _run(stage: str, workdir: str, cache: str, log: str, kill_at: int | None = None) -> int:
  env = tiny_ppo.env(cache)
  if kill_at is not None:
    env.update(KILL_STAGE=stage, KILL_STEP=str(kill_at))
  policy = {"policy_path": os.path.join(workdir, "sft")} if stage != "sft" else {}
  cmd = [sys.executable, os.path.join("tests", "kill_at_step.py"), MAINS[stage],
         f"--workdir={workdir}", "--config=experiments/configs/default.py:smoke",
         *(f"--config.{k}={v}" for k, v in {**OVERRIDES, **policy}.items())]
  with open(log, "w") as f:
    return subprocess.run(cmd, cwd=tiny_ppo.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                          timeout=600).returncode


def _resumed(log: str, stage: str) -> list[int]:
  with open(log) as f:
    return [int(s) for s in re.findall(rf"resuming from checkpoint \S+/{stage}/checkpoints/(\d+)",
                                       f.read())]


def _outputs(workdir: str) -> dict:
  out = {}
  for stage in STAGES:
    out[stage] = tiny_ppo.without_timing(read_jsonl(os.path.join(workdir, stage,
                                                                 "metrics.jsonl")))
    with open(os.path.join(workdir, stage, "model.safetensors"), "rb") as f:
      out[f"{stage} weights"] = f.read()
  return out


def test_kill_9_in_sft_reward_and_dpo_training_resume_to_the_uninterrupted_result(
    tmp_path, tmp_path_factory):
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  ref, work = str(tmp_path / "ref"), str(tmp_path / "w")
  for stage in STAGES:
    assert _run(stage, ref, cache, str(tmp_path / f"ref_{stage}.log")) == 0
  for stage in STAGES:   # 7 steps each, checkpoints at 2, 4, 6: killed after step 5
    killed, rerun = str(tmp_path / f"{stage}_killed.log"), str(tmp_path / f"{stage}.log")
    assert _run(stage, work, cache, killed, kill_at=5) == -9
    assert _run(stage, work, cache, rerun) == 0
    resumed = _resumed(rerun, stage)   # 4, or 2 when the kill came before step 4's save ended
    assert len(resumed) == 1 and resumed[0] in (2, 4), resumed
  assert _outputs(work) == _outputs(ref)
  # A rerun of a finished stage trains nothing.
  assert _run("sft", work, cache, str(tmp_path / "again.log")) == 0
  with open(tmp_path / "again.log") as f:
    assert "sft: finished in" in f.read()
