"""Reward hacking made visible: on a shrunk default task, PPO without the KL penalty games the
reward model (the monitor fires, the gold score ends below its best) and PPO with it does not (the
monitor stays quiet, the gold score rises); and `stop_on_hacking` ends a run at the first firing."""

import os

import numpy as np
import pytest
import tiny_ppo
from flax import nnx

from experiments.configs import default as default_config
from rlhf_jax import data, models, pipeline, sharding
from rlhf_jax.metrics import MetricsWriter, read_jsonl
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig


def _shrunk_config():
  """The default task on a quarter of the data and 32 prompts per PPO iteration."""
  c = default_config.get_config()
  c.sft.update(num_examples=SHRUNK["sft"], epochs=2)
  c.reward.update(num_pairs=SHRUNK["pairs"], epochs=2)
  c.ppo.update(num_prompts=512, batch_size=32, max_prompt_len=10, max_new_tokens=10,
               num_minibatches=2, eval_every=SHRUNK["eval_every"], num_eval_prompts=64,
               max_steps=SHRUNK["steps"], checkpoint_every=0)
  return c


SHRUNK = dict(sft=3000, pairs=3000, eval_every=5, steps=30)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The SFT policy and the reward model of the shrunk task, trained once."""
  workdir = str(tmp_path_factory.mktemp("base"))
  config, paths = _shrunk_config(), pipeline.Paths(workdir)
  pipeline.prepare_default_task(config, paths)
  policy = pipeline.run_sft(config, paths)
  return policy, pipeline.run_reward(config, paths, policy)


def _ppo(tmp_path, base, **overrides) -> list[dict]:
  config, paths = _shrunk_config(), pipeline.Paths(str(tmp_path))
  config.ppo.update(**overrides)
  pipeline.prepare_default_task(config, paths)
  pipeline.run_ppo(config, paths, *base)
  return [r for r in read_jsonl(os.path.join(paths.ppo, "metrics.jsonl")) if "gold_score" in r
          and "eval_reward" in r]


def test_without_kl_the_policy_hacks_the_reward_model_and_the_monitor_fires(tmp_path, base):
  evals = _ppo(tmp_path, base, kl_coef=0.0, learning_rate=HACKING_LR)
  gold = [e["gold_score"] for e in evals]
  assert any(e["reward_hacking"] for e in evals), evals
  assert gold[-1] < max(gold) - 0.3
  assert evals[-1]["eval_reward"] > evals[0]["eval_reward"]
  assert evals[-1]["eval_distinct_2"] < 0.5 * evals[-1]["eval_ref_distinct_2"]


def test_with_kl_the_gold_score_rises_and_the_monitor_stays_quiet(tmp_path, base):
  evals = _ppo(tmp_path, base)
  assert not any(e["reward_hacking"] for e in evals), evals
  assert evals[-1]["gold_score"] > evals[-1]["ref_gold_score"] + 0.2
  assert evals[-1]["eval_win_rate"] > 0.7


HACKING_LR = 1e-3


def test_stop_on_hacking_ends_the_run_at_the_first_firing(tmp_path):
  """A reward for one token and a judge that dislikes it: the proxy rises as the gold falls."""
  tokenizer = data.build_tokenizer(tiny_ppo.WORDS, str(tmp_path / "tok"))
  target = tokenizer.convert_ids_to_tokens(5)   # the token tiny_ppo.target_share rewards

  def gold_fn(text):
    words = text.split()
    return -words.count(target) / max(len(words), 1)

  cfg = PPOTrainerConfig(batch_size=16, max_prompt_len=4, sampling=SamplingConfig(max_new_tokens=4),
                         max_steps=40, eval_every=1, num_eval_prompts=32, seed=3, ppo_epochs=2,
                         num_minibatches=2, stop_on_hacking=True,
                         optim=OptimConfig(learning_rate=1e-2, schedule="constant"))
  mcfg = tiny_ppo.model_cfg(tokenizer)
  p = tiny_ppo.prompts(64)
  writer = MetricsWriter(str(tmp_path / "run"), tensorboard=False)
  trainer = PPOTrainer(cfg, models.CausalLM(mcfg, rngs=nnx.Rngs(0)), tokenizer, p, p[:32],
                       reward_fn=tiny_ppo.target_share, reward_params=None,
                       value_model=models.ScalarModel(mcfg, rngs=nnx.Rngs(1)), gold_fn=gold_fn,
                       mesh=sharding.make_mesh((2, 2, 2)), writer=writer)
  final = trainer.train()
  writer.close()
  records = read_jsonl(writer.path)
  flags = [r["reward_hacking"] for r in records]
  assert flags[-1] == 1 and not any(flags[:-1]), flags
  assert len(records) < cfg.max_steps
  assert final["reward_hacking"] == 1
  assert np.isfinite(final["hacking_gold_drop"]) and final["hacking_gold_drop"] > 0
