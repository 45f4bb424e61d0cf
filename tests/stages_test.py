"""Stages never lose work (`rlhf_jax.stages`, `pipeline`): a rerun of a finished run trains
nothing and changes no file; a changed SFT, PPO or task setting is refused before anything in
the workdir is touched; `overwrite=True` starts over; saves keep the stage's TensorBoard logs and
leave normal permissions; a reward model without a held-out set is still saved."""

import dataclasses
import hashlib
import os
import shutil

import pytest

from experiments.configs import default as default_config
from rlhf_jax import pipeline, stages
from rlhf_jax.config_tree import from_config_dict
from rlhf_jax.metrics import read_jsonl


def tiny_config(**overrides) -> pipeline.ExperimentConfig:
  """The smoke variant, with one PPO step; `overrides` maps "stage.field" to a value."""
  c = default_config.get_config("smoke")
  c.ppo.update(max_steps=1, eval_every=0)
  c.sft.checkpoint_every = 2
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return from_config_dict(pipeline.ExperimentConfig, c)


def snapshot(workdir: str) -> dict[str, tuple[str, int]]:
  """{relative path: (sha256, mode)} of every file and directory under `workdir`."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      p = os.path.join(root, name)
      digest = ("dir" if os.path.isdir(p)
                else hashlib.sha256(open(p, "rb").read()).hexdigest())
      out[os.path.relpath(p, workdir)] = (digest, os.stat(p).st_mode)
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  final = pipeline.run_all(tiny_config(), workdir)
  return workdir, final


def _no_training(monkeypatch):
  for name in ("_train_sft", "_train_reward", "_train_ppo"):
    monkeypatch.setattr(pipeline, name, lambda *a, name=name: pytest.fail(f"{name} ran"))


def test_rerun_of_a_finished_run_trains_nothing_and_changes_no_file(finished, monkeypatch):
  workdir, final = finished
  for stage in ("sft", "reward", "ppo"):
    assert stages.read_record(os.path.join(workdir, stage))["complete"]
  before = snapshot(workdir)
  _no_training(monkeypatch)
  assert pipeline.run_all(tiny_config(), workdir) == {
      k: v for k, v in final.items() if k != "samples"}
  assert snapshot(workdir) == before


@pytest.mark.parametrize("override, named", [
    ({"sft.optim.learning_rate": 1e-3}, "the sft stage .* sft.optim.learning_rate was 0.003, "
                                        "now 0.001"),
    ({"ppo.kl.init_coef": 0.2}, "the ppo stage .* ppo.kl.init_coef was 0.1, now 0.2"),
    ({"task.num_pairs": 200}, "the reward stage .* preferences was 'sha256:"),
])
def test_a_changed_setting_is_refused_before_anything_is_touched(finished, monkeypatch,
                                                                  override, named):
  workdir, _ = finished
  before = snapshot(workdir)
  _no_training(monkeypatch)
  with pytest.raises(stages.StageMismatchError, match=named + ".*--config.overwrite=True"):
    pipeline.run_all(tiny_config(**override), workdir)
  assert snapshot(workdir) == before


def test_overwrite_starts_over_and_later_stages_then_refuse_the_new_policy(finished, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(finished[0], workdir)
  paths = pipeline.Paths(workdir)
  old_model = open(os.path.join(paths.sft, "model.safetensors"), "rb").read()
  changed = tiny_config(**{"sft.optim.learning_rate": 1e-3})
  pipeline.run_sft(dataclasses.replace(changed, overwrite=True), paths)
  record = stages.read_record(paths.sft)
  assert record["complete"] and record["fingerprint"]["sft.optim.learning_rate"] == 1e-3
  assert open(os.path.join(paths.sft, "model.safetensors"), "rb").read() != old_model
  steps = [r["step"] for r in read_jsonl(os.path.join(paths.sft, "metrics.jsonl"))]
  assert steps == sorted(set(steps))   # started over: each step logged once
  # The reward model was trained from the old policy: a plain rerun refuses it, untouched.
  before = snapshot(workdir)
  with pytest.raises(stages.StageMismatchError, match="the reward stage .* policy was"):
    pipeline.run_all(changed, workdir)
  assert snapshot(workdir) == before


def test_saves_keep_tensorboard_logs_and_use_normal_permissions(finished):
  workdir, _ = finished
  umask = os.umask(0)
  os.umask(umask)
  for stage in ("sft", "reward", "ppo"):
    tb = os.path.join(workdir, stage, "tb")
    assert any(f.startswith("events") for _, _, fs in os.walk(tb) for f in fs), stage
  for path, (digest, mode) in snapshot(workdir).items():
    want = (0o777 if digest == "dir" else 0o666) & ~umask
    assert mode & 0o777 == want, (path, oct(mode))
  assert not [p for p in snapshot(workdir) if ".tmp" in p]


def test_reward_model_without_a_held_out_set_is_saved(finished, tmp_path):
  config = tiny_config(**{"reward.eval_fraction": 0.0})
  paths = pipeline.Paths(str(tmp_path))
  out = pipeline.run_reward(config, paths, os.path.join(finished[0], "sft"))
  assert os.path.exists(os.path.join(out, "model.safetensors"))
  assert stages.read_record(out)["complete"]


def test_a_finished_ppo_stage_given_more_steps_resumes(finished, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  shutil.copytree(finished[0], workdir)
  for name in ("_train_sft", "_train_reward"):
    monkeypatch.setattr(pipeline, name, lambda *a, name=name: pytest.fail(f"{name} ran"))
  pipeline.run_all(tiny_config(**{"ppo.max_steps": 2}), workdir)
  records = read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl"))
  assert [r["step"] for r in records if "reward_mean" in r] == [1, 2]
  assert stages.read_record(os.path.join(workdir, "ppo"))["budget"]["ppo.max_steps"] == 2
