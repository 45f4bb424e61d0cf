"""Reward hacking made visible: on a shrunk default task, PPO without the KL penalty games the
reward model (the monitor fires, the gold score ends below its best) and PPO with it does not (the
monitor stays quiet, the gold score rises); and `stop_on_hacking` ends a run at the first firing.

The two runs on the shrunk task (and the SFT policy and reward model they share) train in one
process of their own, compiled at XLA's default optimisation level as a user's run is, not at the
test processes' level 0 (conftest): their assertions are learning outcomes of one seed, and other
rounding gives another trajectory. To run them alone, as the test does:
`JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/hacking_test.py
OUT_DIR`.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_ppo
from flax import nnx

from experiments.configs import default as default_config
from rlhf_jax import data, models, pipeline, sharding, tasks
from rlhf_jax.config_tree import from_config_dict
from rlhf_jax.metrics import MetricsWriter, read_jsonl
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig


def _shrunk_config(variant: str = "default") -> pipeline.ExperimentConfig:
  """The variant on half the default task's demonstrations and 60 % of its pairs, 32 prompts per
  PPO iteration, 30 iterations."""
  c = default_config.get_config(variant)
  c.task.update(num_sft=3000, num_pairs=6000, num_prompts=512)
  c.sft.epochs = c.reward.epochs = 2
  c.ppo.update(batch_size=32, max_prompt_len=10, num_minibatches=2, eval_every=5,
               num_eval_prompts=64, max_steps=30, checkpoint_every=0)
  c.ppo.sampling.max_new_tokens = 10   # the longest completion and its EOS
  return from_config_dict(pipeline.ExperimentConfig, c)


VARIANTS = ("hacking", "default")


def train_variants(root: str) -> None:
  """The shrunk task's SFT policy and reward model, trained once, then PPO in each of VARIANTS
  from them; each variant's run is written to <root>/<variant>."""
  paths = pipeline.Paths(os.path.join(root, "base"))
  config = tasks.prepare(_shrunk_config(), paths)
  policy = pipeline.run_sft(config, paths)
  reward = pipeline.run_reward(config, paths, policy)
  for variant in VARIANTS:
    paths = pipeline.Paths(os.path.join(root, variant))
    pipeline.run_ppo(tasks.prepare(_shrunk_config(variant), paths), paths, policy, reward)


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, list[dict]]:
  """Each variant's evaluation records, from one `train_variants` process (module docstring)."""
  root = str(tmp_path_factory.mktemp("variants"))
  env = tiny_ppo.env(tiny_ppo.cache_dir(tmp_path_factory), num_devices=8, xla_optimize=True)
  proc = subprocess.run([sys.executable, __file__, root], cwd=tiny_ppo.ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {v: [r for r in read_jsonl(os.path.join(root, v, "ppo", "metrics.jsonl"))
              if "gold_score" in r and "reward_mean" in r] for v in VARIANTS}


def test_without_kl_the_policy_games_the_reward_model_and_the_monitor_fires(evaluations):
  evals = evaluations["hacking"]
  gold = [evals[0]["ref_gold_score"]] + [e["gold_score"] for e in evals]
  assert any(e["reward_hacking"] for e in evals), evals
  assert gold[-1] < max(gold) - 0.5   # seen: -1.00, the reference's -0.01
  assert evals[-1]["eval_reward"] > evals[-1]["eval_ref_reward"] + 1.0


def test_with_kl_the_gold_score_rises_and_the_monitor_stays_quiet(evaluations):
  evals = evaluations["default"]
  gold = [e["gold_score"] for e in evals]
  assert not any(e["reward_hacking"] for e in evals), evals
  # Gold means over 64 prompts move by ~0.1 between evaluations: compare the last three with the
  # reference's over the run (seen: 0.30 against -0.08), and the end with the start.
  assert np.mean(gold[-3:]) > np.mean([e["ref_gold_score"] for e in evals]) + 0.15
  assert gold[-1] > gold[0]
  assert evals[-1]["eval_win_rate"] > 0.7


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


if __name__ == "__main__":
  jax.config.update("jax_threefry_partitionable", True)   # as conftest and the mains set it
  train_variants(sys.argv[1])
