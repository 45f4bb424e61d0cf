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
from rlhf_jax import data, models, pipeline, tasks
from rlhf_jax.config_tree import from_config_dict
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.trainers import ppo as ppo_trainer
from rlhf_jax.trainers import ppo_eval
from rlhf_jax.trainers import reward, sft

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
  config = tasks.prepare(config, paths)
  pipeline.run_ppo(config, paths, os.path.join(workdir, "sft"), os.path.join(workdir, "reward"))
  records = read_jsonl(os.path.join(tmp_path, "ppo", "metrics.jsonl"))
  assert max(r["step"] for r in records) == 1


def test_max_steps_bounds_the_run(tmp_path, smoke_run):
  workdir, _, _ = smoke_run
  config = smoke_config(max_steps=2, eval_every=0)
  paths = pipeline.Paths(str(tmp_path))
  config = tasks.prepare(config, paths)
  final = pipeline.run_ppo(config, paths, os.path.join(workdir, "sft"),
                           os.path.join(workdir, "reward"))
  records = read_jsonl(os.path.join(tmp_path, "ppo", "metrics.jsonl"))
  assert [r["step"] for r in records if "reward_mean" in r] == [1, 2]
  assert "eval_reward" in final   # evaluated once at the end
  with open(os.path.join(tmp_path, "ppo", "policy", "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def _spy(monkeypatch, module, name: str, calls: list) -> None:
  """Records what `module.name` returns to the stages."""
  fn = getattr(module, name)

  def recorded(*args, **kwargs):
    calls.append(fn(*args, **kwargs))
    return calls[-1]
  monkeypatch.setattr(module, name, recorded)


def test_chat_template_reaches_every_stage(tmp_path, monkeypatch):
  """--config.use_chat_template=True: the SFT rows, the reward model's pairs and the PPO prompts
  are the template's turns, and the PPO samples show the policy was prompted with them."""
  tok = data.build_tokenizer(data.vocabulary(), str(tmp_path / "tok"))
  tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
  tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                       "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}<|assistant|>"
                       "{% endif %}")
  tok.save_pretrained(str(tmp_path / "tok"))
  user, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
  sft_rows, pairs, prompts = [], [], []
  _spy(monkeypatch, sft, "encode_examples", sft_rows)
  _spy(monkeypatch, reward, "encode_pairs", pairs)
  _spy(monkeypatch, ppo_trainer, "encode_prompts", prompts)
  _spy(monkeypatch, ppo_eval, "encode_prompts", prompts)
  config = dataclasses.replace(smoke_config(max_steps=1, eval_every=0, max_prompt_len=16),
                               use_chat_template=True, tokenizer_path=str(tmp_path / "tok"))
  pipeline.run_all(config, str(tmp_path / "work"))

  assert sft_rows and pairs
  for rows in sft_rows:   # train and held-out: [<|user|> prompt <eos> <|assistant|> | reply <eos>]
    start = np.argmax(rows["completion_mask"], axis=1)
    np.testing.assert_array_equal(rows["ids"][np.arange(len(start)), start - 1], assistant)
    assert (rows["ids"] == user).any(axis=1).all()
  for rows in pairs:
    for side in ("chosen", "rejected"):
      ids = rows[f"{side}_ids"]
      assert ((ids == user).any(axis=1) & (ids == assistant).any(axis=1)).all()
  assert len(prompts) == 2   # train and eval prompts, each ending in the generation prompt
  for enc in prompts:
    np.testing.assert_array_equal(enc.ids[:, -1], assistant)
  with open(os.path.join(tmp_path, "work", "ppo", "samples.md")) as f:
    assert "<|user|>" in f.read()
