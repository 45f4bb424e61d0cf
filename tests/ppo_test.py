"""ppo_update: device-count invariance, learning on a known reward, registry extension."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import kl as kl_lib
from rlhf_jax import losses, models, optim, ppo, sharding
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.collect import collect
from rlhf_jax.masked import masked_mean
from rlhf_jax.rollout import SamplingConfig

VOCAB, EOS, PAD, TARGET = 32, 2, 0, 7
CFG = models.DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
SAMPLING = SamplingConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)


def target_share(params, ro):
  """Known reward: the share of TARGET tokens in the completion."""
  del params
  m = ro.completion_mask
  return ((ro.completion_ids == TARGET) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def _prompts(b, p=4, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, (b, p))
  mask = np.ones((b, p), np.int32)
  mask[: b // 4, : p // 2] = 0   # some left padding
  return jnp.asarray(np.where(mask > 0, ids, PAD), jnp.int32), jnp.asarray(mask)


def _setup(pcfg, lr=3e-3, seed=0):
  policy = models.CausalLM(CFG, rngs=nnx.Rngs(seed))
  value = models.ScalarModel(CFG, rngs=nnx.Rngs(seed + 1)) if pcfg.critic == "separate" else None
  ref_graphdef, ref_params = nnx.split(policy)
  ref_params = jax.tree.map(jnp.copy, ref_params)   # the policy's buffers get donated
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr))
  state = ppo.init_train_state(pcfg, policy, tx, jax.random.key(seed), value)
  return state, ref_graphdef, ref_params


def _collect_fn(pcfg, ref_graphdef):
  run = jax.jit(functools.partial(collect, pcfg, ref_graphdef=ref_graphdef,
                                  reward_fn=target_share))
  return lambda state, ref_params, ids, mask, key: run(
      state, ids, mask, key, ref_params=ref_params, reward_params=None)


def _train(pcfg, iters, ids, mask, lr=3e-3, seed=0):
  state, ref_graphdef, ref_params = _setup(pcfg, lr, seed)
  collect = _collect_fn(pcfg, ref_graphdef)
  update = jax.jit(ppo.ppo_update, static_argnums=0, donate_argnums=1)
  history = []
  for it in range(iters):
    scored, m = collect(state, ref_params, ids, mask, jax.random.key(100 + it))
    state, um = update(pcfg, state, scored)
    history.append({**jax.device_get(m), **jax.device_get(um)})
  return state, history


def test_learns_known_reward_with_gae_and_bounded_kl():
  ids, mask = _prompts(32)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=4, critic="separate",
                       kl=kl_lib.KLConfig(init_coef=0.05))
  _, hist = _train(pcfg, 14, ids, mask)
  first = np.mean([h["raw_score_mean"] for h in hist[:2]])
  last = np.mean([h["raw_score_mean"] for h in hist[-3:]])
  assert last > first + 0.15, (first, last)
  assert max(h["kl"] for h in hist) < 15.0
  assert abs(hist[0]["kl"]) < 1e-4   # policy == reference at the start
  for key in ("entropy", "approx_kl", "clipfrac", "vf_clipfrac", "value_loss",
              "explained_variance", "response_length", "eos_rate", "reward_std", "grad_norm"):
    assert np.isfinite(hist[-1][key]), key
  assert hist[-1]["explained_variance"] > hist[0]["explained_variance"]


def test_learns_with_group_relative_estimator_and_kl_in_loss():
  ids, mask = _prompts(8)
  ids, mask = jnp.repeat(ids, 4, axis=0), jnp.repeat(mask, 4, axis=0)   # groups of 4 per prompt
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, critic="none",
                       whiten_advantages=False, group_size=4,
                       policy_loss=losses.PolicyLossConfig(name="grpo"),
                       advantage=AdvantageConfig(estimator="grpo"),
                       kl=kl_lib.KLConfig(estimator="k3", in_reward=False, init_coef=0.02))
  _, hist = _train(pcfg, 12, ids, mask)
  first = np.mean([h["raw_score_mean"] for h in hist[:2]])
  last = np.mean([h["raw_score_mean"] for h in hist[-3:]])
  assert last > first + 0.15, (first, last)
  assert "kl_loss" in hist[-1] and max(h["kl"] for h in hist) < 15.0


def test_shared_critic_trains_value_head():
  ids, mask = _prompts(16)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, critic="shared")
  state, hist = _train(pcfg, 4, ids, mask)
  assert np.abs(np.asarray(state.params["value"]["head"])).sum() > 0
  assert all(np.isfinite(h["value_loss"]) for h in hist)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_same_update_on_one_and_eight_devices(mesh_shape):
  ids, mask = _prompts(16)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, ppo_epochs=2, critic="separate")
  state, ref_graphdef, ref_params = _setup(pcfg)
  scored, _ = _collect_fn(pcfg, ref_graphdef)(state, ref_params, ids, mask, jax.random.key(1))
  scored = jax.device_get(scored)

  def run(mesh):
    s = jax.device_put(state, ppo.train_state_shardings(state, mesh))
    batch = jax.tree.map(
        lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)), scored)
    out_sh = ppo.train_state_shardings(state, mesh)
    update = jax.jit(ppo.ppo_update, static_argnums=0, out_shardings=(out_sh, None))
    new_state, metrics = update(pcfg, s, batch)
    return jax.device_get(new_state.params), jax.device_get(metrics), new_state

  one = run(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  eight = run(sharding.make_mesh(mesh_shape))
  assert len(jax.tree.leaves(eight[2].params)[0].sharding.device_set) == 8
  for k in one[1]:
    np.testing.assert_allclose(eight[1][k], one[1][k], atol=1e-5, rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one[0], eight[0])


def test_registered_custom_loss_trains_without_touching_the_trainer():
  name = "test_ppo_token_sum"
  if name not in losses.POLICY_LOSSES:
    @losses.register_policy_loss(name)
    def token_sum_loss(cfg, logprobs, old_logprobs, advantages, mask):
      """PPO clipped surrogate summed over tokens and divided by a constant (Dr. GRPO style)."""
      ratio = jnp.exp(logprobs - old_logprobs)
      clipped = jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
      per_token = jnp.maximum(-advantages * ratio, -advantages * clipped) * mask
      return per_token.sum() / (mask.shape[0] * mask.shape[1]), {
          "clipfrac": masked_mean((jnp.abs(ratio - 1) > cfg.clip_eps).astype(jnp.float32), mask),
          "approx_kl": masked_mean(ratio - 1 - jnp.log(ratio), mask),
          "custom_metric": jnp.ones(()),
      }
  ids, mask = _prompts(32)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=4, critic="separate",
                       policy_loss=losses.PolicyLossConfig(name=name))
  _, hist = _train(pcfg, 14, ids, mask)
  assert hist[-1]["custom_metric"] == 1.0
  first = np.mean([h["raw_score_mean"] for h in hist[:2]])
  last = np.mean([h["raw_score_mean"] for h in hist[-3:]])
  assert last > first + 0.1, (first, last)


def test_unknown_loss_name_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown policy loss 'nope'.*ppo"):
    ppo.PPOConfig(policy_loss=losses.PolicyLossConfig(name="nope"))


def test_nonfinite_minibatch_is_skipped_and_counted():
  ids, mask = _prompts(8)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, ppo_epochs=1, critic="separate")
  state, ref_graphdef, ref_params = _setup(pcfg)
  scored, _ = _collect_fn(pcfg, ref_graphdef)(state, ref_params, ids, mask, jax.random.key(1))
  bad = scored.replace(token_rewards=scored.token_rewards.at[0, 0].set(jnp.nan))
  before = jax.device_get(state.params)
  new_state, metrics = jax.jit(ppo.ppo_update, static_argnums=0)(pcfg, state, bad)
  assert metrics["nonfinite_steps"] == 2   # whitening spreads the NaN to both minibatches
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(new_state.params))


def test_explained_variance_matches_numpy():
  rng = np.random.default_rng(0)
  v, r = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  m = (rng.random((4, 6)) > 0.3).astype(np.float32)
  want = 1 - np.var((r - v)[m > 0]) / np.var(r[m > 0])
  got = ppo.explained_variance(jnp.asarray(v), jnp.asarray(r), jnp.asarray(m))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adaptive_kl_controller_state_moves_with_kl():
  ids, mask = _prompts(16)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, critic="separate",
                       kl=kl_lib.KLConfig(estimator="k3", controller="adaptive", target=0.01,
                                          horizon=100, init_coef=0.1))
  state, hist = _train(pcfg, 3, ids, mask)
  assert hist[-1]["kl"] > 0.01
  assert float(state.kl.coef) > 0.1   # KL above target -> coefficient grows


def _field_paths(cls, prefix=""):
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(f.default):
      yield from _field_paths(type(f.default), f"{prefix}{f.name}.")
    else:
      yield prefix + f.name


def test_sampling_and_training_temperature_cannot_diverge():
  from rlhf_jax.trainers.ppo import PPOTrainerConfig
  # One home: the only temperature anywhere in the PPO config tree is the sampler's.
  assert [p for p in _field_paths(PPOTrainerConfig) if "temperature" in p] == [
      "sampling.temperature"]
  ids, mask = _prompts(8)
  pcfg = ppo.PPOConfig(sampling=dataclasses.replace(SAMPLING, temperature=0.7), ppo_epochs=1,
                       num_minibatches=1, critic="separate")
  state, ref_graphdef, ref_params = _setup(pcfg)
  scored, metrics = _collect_fn(pcfg, ref_graphdef)(state, ref_params, ids, mask,
                                                    jax.random.key(3))
  assert scored.rollout.temperature == 0.7
  # Reference == policy at the start: score recomputed the sampler's own tempered log-probs.
  np.testing.assert_allclose(scored.ref_logprobs, scored.rollout.logprobs, atol=1e-5)
  assert abs(float(metrics["kl"])) < 1e-4
  # ppo_update's first (and only) step sees ratio 1 on every token: it used T = 0.7 too.
  _, um = jax.jit(ppo.ppo_update, static_argnums=0)(pcfg, state, scored)
  assert abs(float(um["approx_kl"])) < 1e-6 and float(um["clipfrac"]) == 0.0


def _ragged_off_policy(scored, seed=0):
  """`scored` with completion masks cut to random prefixes (one row left empty), so microbatches
  hold different numbers of valid tokens and of non-empty rows, and with random rewards, values
  and sampling log-probs, so advantages, ratios and value targets are far from trivial."""
  rng = np.random.default_rng(seed)
  noise = lambda x, scale: x + scale * jnp.asarray(rng.normal(size=x.shape), x.dtype)
  mask = scored.rollout.completion_mask
  b, n = mask.shape
  lengths = rng.integers(1, n + 1, b)
  lengths[3] = 0
  ragged = jnp.where(jnp.arange(n) < jnp.asarray(lengths)[:, None], mask, 0.0)
  rollout = scored.rollout.replace(completion_mask=ragged,
                                   logprobs=noise(scored.rollout.logprobs, 0.3))
  values = None if scored.values is None else noise(scored.values, 1.0)
  return scored.replace(rollout=rollout, token_rewards=noise(scored.token_rewards, 1.0),
                        values=values)


MICRO_CONFIGS = {
    "separate_ppo": dict(critic="separate", ent_coef=0.01),
    "none_grpo_kl_in_loss": dict(
        critic="none", whiten_advantages=False, group_size=4, ent_coef=0.01,
        policy_loss=losses.PolicyLossConfig(name="grpo"),
        advantage=AdvantageConfig(estimator="grpo"),
        kl=kl_lib.KLConfig(estimator="k3", in_reward=False, init_coef=0.05)),
    "shared_dual_clip_mse": dict(critic="shared",
                                 policy_loss=losses.PolicyLossConfig(name="ppo_dual_clip"),
                                 value_loss=losses.ValueLossConfig(name="mse")),
}


@pytest.mark.parametrize("name", list(MICRO_CONFIGS))
def test_microbatches_give_the_unsplit_update(name):
  # 16 rows, 2 minibatches of 8: 4 microbatches of 2 rows each.
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, ppo_epochs=2, **MICRO_CONFIGS[name])
  ids, mask = _prompts(16)
  # Plain SGD: the new params are the old minus lr times the summed gradients, so they compare
  # the gradients themselves. Adam's g / (|g| + eps) would blow up the float rounding of
  # near-zero gradient entries (unused embedding rows) whatever the accumulation.
  state, ref_graphdef, ref_params = _setup(pcfg)
  policy = nnx.merge(state.policy_graphdef, state.params["policy"])
  value = (nnx.merge(state.value_graphdef, state.params["value"]) if pcfg.critic == "separate"
           else None)
  state = ppo.init_train_state(pcfg, policy, optax.sgd(0.1), jax.random.key(0), value)
  scored, _ = _collect_fn(pcfg, ref_graphdef)(state, ref_params, ids, mask, jax.random.key(1))
  scored = _ragged_off_policy(scored)
  update = jax.jit(ppo.ppo_update, static_argnums=0)
  whole_state, whole = jax.device_get(update(pcfg, state, scored))
  micro_state, micro = jax.device_get(
      update(dataclasses.replace(pcfg, micro_batch_size=2), state, scored))
  assert whole.keys() == micro.keys()
  for k in whole:
    np.testing.assert_allclose(micro[k], whole[k], atol=1e-6, rtol=1e-6, err_msg=k)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), whole_state.params,
                       jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), whole_state.params,
               micro_state.params)


def test_microbatch_size_must_divide_the_minibatch():
  ids, mask = _prompts(8)
  pcfg = ppo.PPOConfig(sampling=SAMPLING, num_minibatches=2, ppo_epochs=1, micro_batch_size=3)
  state, ref_graphdef, ref_params = _setup(pcfg)
  scored, _ = _collect_fn(pcfg, ref_graphdef)(state, ref_params, ids, mask, jax.random.key(1))
  with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the minibatch size 4"):
    ppo.ppo_update(pcfg, state, scored)
  with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
    ppo.PPOConfig(micro_batch_size=0)
  from rlhf_jax.trainers.ppo import PPOTrainerConfig
  with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the minibatch size 8"):
    PPOTrainerConfig(batch_size=8, group_size=2, num_minibatches=2, micro_batch_size=3)


def test_losses_declare_what_they_average_over():
  normalizer = losses.loss_normalizer
  assert normalizer(losses.POLICY_LOSSES, "grpo") == "sequence"
  assert {normalizer(losses.POLICY_LOSSES, n) for n in ("ppo", "ppo_dual_clip", "reinforce")} == {
      "token"}
  assert {normalizer(losses.VALUE_LOSSES, n) for n in losses.VALUE_LOSSES} == {"token"}
  with pytest.raises(ValueError, match="normalizer must be one of"):
    losses.register_policy_loss("test_bad_normalizer", normalizer="pairs")
  counts = losses.normalizer_counts(jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]]))
  assert {k: float(v) for k, v in counts.items()} == {"token": 3.0, "sequence": 2.0, "row": 3.0}
