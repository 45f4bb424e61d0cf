"""End to end: SFT -> reward model -> PPO on the built-in task (smoke size), and the stopping rules."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from experiments.configs import default as default_config
from rlhf_jax import models, pipeline
from rlhf_jax.config_tree import from_config_dict
from rlhf_jax.metrics import read_jsonl

REQUIRED_KEYS = ("step", "reward_mean", "kl", "entropy", "approx_kl", "clipfrac", "value_loss",
                 "explained_variance", "tokens_per_s")


def smoke_config(**ppo) -> pipeline.ExperimentConfig:
  """The smoke variant with some PPO fields replaced."""
  config = from_config_dict(pipeline.ExperimentConfig, default_config.get_config("smoke"))
  return dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **ppo))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rlhf"))
  config = smoke_config()
  final = pipeline.run_all(config, workdir)
  return workdir, config, final


def test_outputs_of_a_short_end_to_end_run(smoke_run):
  workdir, config, final = smoke_run
  records = read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl"))
  steps = [r["step"] for r in records if "reward_mean" in r]
  assert steps == list(range(1, config.ppo.max_steps + 1))
  for r in records:
    if "reward_mean" in r:
      for key in REQUIRED_KEYS:
        assert key in r and np.isfinite(r[key]), key
  assert {"eval_reward", "gold_score", "eval_win_rate", "eval_distinct_2"} <= set(final)
  assert os.path.getsize(os.path.join(workdir, "ppo", "curves.png")) > 1000
  assert any(f.startswith("events") for _, _, fs in os.walk(os.path.join(workdir, "ppo", "tb"))
             for f in fs)
  rm = read_jsonl(os.path.join(workdir, "reward", "metrics.jsonl"))
  assert 0.0 <= rm[-1]["final_eval_accuracy"] <= 1.0


def test_final_policy_loads_in_transformers_with_the_same_logits(smoke_run):
  workdir, _, _ = smoke_run
  path = os.path.join(workdir, "ppo", "policy")
  tok = transformers.AutoTokenizer.from_pretrained(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  ours = models.from_pretrained(path)
  ids = np.asarray([tok("review : the film at the museum was")["input_ids"]])
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids))[0])
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_reward_threshold_stops_early(tmp_path, smoke_run):
  workdir, config, _ = smoke_run
  config = smoke_config(max_steps=50, eval_every=1,
                        reward_threshold=-1e9)   # met at the first evaluation
  paths = pipeline.Paths(str(tmp_path))
  config = pipeline.prepare_default_task(config, paths)
  pipeline.run_ppo(config, paths, os.path.join(workdir, "sft"), os.path.join(workdir, "reward"))
  records = read_jsonl(os.path.join(tmp_path, "ppo", "metrics.jsonl"))
  assert max(r["step"] for r in records) == 1


def test_max_steps_bounds_the_run(tmp_path, smoke_run):
  workdir, _, _ = smoke_run
  config = smoke_config(max_steps=2, eval_every=0)
  paths = pipeline.Paths(str(tmp_path))
  config = pipeline.prepare_default_task(config, paths)
  final = pipeline.run_ppo(config, paths, os.path.join(workdir, "sft"),
                           os.path.join(workdir, "reward"))
  records = read_jsonl(os.path.join(tmp_path, "ppo", "metrics.jsonl"))
  assert [r["step"] for r in records if "reward_mean" in r] == [1, 2]
  assert "eval_reward" in final   # evaluated once at the end
  with open(os.path.join(tmp_path, "ppo", "policy", "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
