"""Every registered policy loss and advantage estimator trains one tiny PPO step (collect +
ppo_update) with finite metrics; the per-sequence KL in the loss against a NumPy transcription;
ReMax's greedy baselines filled by collect."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import advantages, losses, models, ppo
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.collect import collect
from rlhf_jax.kl import KLConfig
from rlhf_jax.losses import PolicyLossConfig
from rlhf_jax.mismatch import MismatchConfig
from rlhf_jax.rollout import SamplingConfig, rollout
from rlhf_jax.score import score

VOCAB, EOS, PAD = 24, 2, 0
CFG = models.DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, num_layers=1,
                           num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32)
SAMPLING = SamplingConfig(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)


def reward(params, ro):
  del params
  return (ro.completion_ids * ro.completion_mask).sum(-1) / 10.0


def _models():
  policy = models.CausalLM(CFG, rngs=nnx.Rngs(0))
  ref_graphdef, ref_params = nnx.split(models.CausalLM(CFG, rngs=nnx.Rngs(5)))
  return policy, ref_graphdef, ref_params


def _step(pcfg, lr=1e-2):
  policy, ref_graphdef, ref_params = _models()
  state = ppo.init_train_state(pcfg, policy, optax.adam(lr), jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (8, 3)), jnp.int32)
  scored, m = jax.jit(functools.partial(collect, pcfg, ref_graphdef=ref_graphdef,
                                        reward_fn=reward))(
      state, ids, jnp.ones_like(ids), jax.random.key(1), ref_params=ref_params,
      reward_params=None)
  new, um = jax.jit(ppo.ppo_update, static_argnums=0)(pcfg, state, scored)
  return state, new, scored, {**jax.device_get(m), **jax.device_get(um)}


def _cfg(loss="grpo", estimator="grpo", critic="none", **kw):
  return ppo.PPOConfig(sampling=SAMPLING, group_size=4, critic=critic, ppo_epochs=1,
                       advantage=AdvantageConfig(estimator=estimator),
                       policy_loss=PolicyLossConfig(name=loss, clip_eps_high=0.28),
                       kl=KLConfig(in_reward=False, estimator="k3", init_coef=0.1), **kw)


def _check_trained(state, new, metrics):
  for k, v in metrics.items():
    assert np.all(np.isfinite(v)), k
  assert metrics["nonfinite_steps"] == 0
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params["policy"],
                       state.params["policy"])
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("name", [n for n in losses.POLICY_LOSSES.names()
                                  if not n.startswith("test_")])
def test_every_policy_loss_trains_a_step(name):
  state, new, _, metrics = _step(_cfg(loss=name))
  _check_trained(state, new, metrics)


@pytest.mark.parametrize("name", [n for n in advantages.ADVANTAGE_ESTIMATORS.names()
                                  if not n.startswith("test_")])
def test_every_advantage_estimator_trains_a_step(name):
  critic = "shared" if name == "gae" else "none"
  state, new, _, metrics = _step(_cfg(estimator=name, loss="ppo", critic=critic))
  _check_trained(state, new, metrics)


def test_remax_baselines_are_the_greedy_completions_returns():
  pcfg = _cfg(estimator="remax", loss="ppo")
  state, _, scored, metrics = _step(pcfg)
  _, ref_graphdef, ref_params = _models()
  ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (8, 3)), jnp.int32)
  greedy = rollout(state.policy_graphdef, state.params["policy"], ids, jnp.ones_like(ids),
                   jax.random.key(1), dataclasses.replace(SAMPLING, greedy=True))
  g, _ = score(pcfg, greedy, ref_graphdef=ref_graphdef, ref_params=ref_params, reward_fn=reward,
               reward_params=None, kl_coef=state.kl.coef)
  # KL is in the loss here, so the greedy return is its reward alone.
  np.testing.assert_allclose(scored.baselines, reward(None, greedy), rtol=1e-6)
  np.testing.assert_allclose(scored.baselines, np.asarray(g.token_rewards).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(metrics["remax_baseline_mean"], np.mean(scored.baselines), rtol=1e-6)


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_kl_in_the_loss_per_token_or_per_sequence_matches_numpy(average):
  pcfg = dataclasses.replace(_cfg(estimator="dr_grpo", loss="reinforce"),
                             kl=KLConfig(in_reward=False, estimator="k3", init_coef=0.1,
                                         loss_average=average),
                             mismatch=MismatchConfig(log_metrics=True))
  _, _, scored, metrics = _step(pcfg, lr=0.0)
  mask = np.asarray(scored.rollout.completion_mask)
  lp = np.asarray(scored.trainer_logprobs, np.float64)
  ref = np.asarray(scored.ref_logprobs, np.float64)
  k3 = np.exp(ref - lp) - (ref - lp) - 1
  rows = [k3[i, mask[i] > 0] for i in range(len(mask)) if mask[i].any()]
  want = (np.concatenate(rows).mean() if average == "token"
          else np.mean([r.mean() for r in rows]))
  assert len({len(r) for r in rows}) > 1   # rows of different lengths tell the two apart
  np.testing.assert_allclose(metrics["kl_loss"], want, rtol=1e-4)


# Each run names one of the 2025 policy losses and, alongside, one of the other new names (an
# advantage estimator, a mismatch correction, dynamic sampling), so every one of them goes
# through the flag parser, the config tree and the PPO stage once.
CLI_RUNS = [
    {"ppo.policy_loss.name": "gspo", "ppo.advantage.estimator": "dr_grpo"},
    {"ppo.policy_loss.name": "gspo_token", "ppo.advantage.estimator": "remax"},
    {"ppo.policy_loss.name": "dr_grpo", "ppo.mismatch.correction": "tis"},
    {"ppo.policy_loss.name": "dapo", "ppo.policy_loss.clip_eps_high": 0.28,
     "ppo.mismatch.correction": "icepop"},
    {"ppo.policy_loss.name": "cispo", "ppo.mismatch.correction": "seq_mask"},
    {"ppo.policy_loss.name": "gmpo", "ppo.dynamic_sampling.enabled": True},
    {"ppo.policy_loss.name": "sapo", "ppo.mismatch.recompute_logprobs": True},
]


@pytest.mark.parametrize("overrides", CLI_RUNS, ids=lambda o: o["ppo.policy_loss.name"])
def test_every_new_name_trains_from_the_command_line(overrides, tmp_path):
  """`--config.ppo.policy_loss.name=gspo ...` on the smoke config, parsed and checked as the PPO
  main does (`experiments.common.stage_config` without its process setup), trains a PPO stage
  of two iterations."""
  from absl import flags
  from ml_collections import config_flags

  import tiny_ppo
  from rlhf_jax import pipeline, plugins, preflight
  from rlhf_jax.metrics import read_jsonl

  inputs = tiny_ppo.write_inputs(tmp_path / "inputs")
  flat = {**inputs, **tiny_ppo.ppo_overrides(2), "ppo.eval_every": 0, "ppo.group_size": 2,
          "ppo.critic": "none", "ppo.kl.in_reward": False, "ppo.kl.estimator": "k3",
          "ppo.advantage.estimator": "grpo", **overrides}
  argv = ["prog", "--config=experiments/configs/default.py:smoke",
          *(f"--config.{k}={v}" for k, v in flat.items())]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  work = str(tmp_path / "run")
  config = plugins.build_config(pipeline.ExperimentConfig, fv.config)
  preflight.check_run(config, work, ("ppo",))
  for path, value in overrides.items():   # the flag reached the built dataclasses
    obj = config
    for part in path.split("."):
      obj = getattr(obj, part)
    assert obj == value, path
  pipeline.run_ppo(config, pipeline.Paths(work), config.policy_path, config.reward_path)
  records = [r for r in read_jsonl(f"{work}/ppo/metrics.jsonl") if "pg_loss" in r]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0, r
  if "ppo.dynamic_sampling.enabled" in overrides:
    assert all("dynamic_sampling/batches" in r for r in records)
  if "ppo.mismatch.correction" in overrides or "ppo.mismatch.recompute_logprobs" in overrides:
    assert all(abs(r["mismatch/abs_logp_diff"]) < 1e-4 for r in records)
