"""Mixed precision: bfloat16 compute with float32 master weights and optimizer state, trained
(not only run forward); frozen reference and reward weights stored in bfloat16 when asked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models, optim, ppo
from rlhf_jax.collect import collect
from rlhf_jax.rollout import SamplingConfig

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)

VOCAB, EOS, PAD, TARGET = 32, 2, 0, 7
BF16 = models.DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                            dtype="bfloat16", param_dtype="float32")


def _target_share(params, ro):
  del params
  hits = jnp.where(ro.completion_mask > 0, (ro.completion_ids == TARGET).astype(jnp.float32), 0.0)
  return hits.sum(-1) / jnp.maximum(ro.completion_mask.sum(-1), 1.0)


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_compute_trains_fp32_master_weights():
  cfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=8, eos_token_id=EOS,
                                              pad_token_id=PAD),
                      num_minibatches=4, critic="separate")
  policy = models.CausalLM(BF16, rngs=nnx.Rngs(0))
  ref_graphdef, ref_params = nnx.split(policy)
  ref_params = jax.tree.map(jnp.copy, ref_params)
  state = ppo.init_train_state(cfg, policy, optim.make_optimizer(optim.OptimConfig(3e-3)),
                               jax.random.key(0), models.ScalarModel(BF16, rngs=nnx.Rngs(1)))
  run = jax.jit(functools.partial(collect, cfg, ref_graphdef=ref_graphdef,
                                  reward_fn=_target_share))
  update = jax.jit(ppo.ppo_update, static_argnums=0, donate_argnums=1)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (32, 4)), jnp.int32)
  mask = jnp.ones_like(ids)
  before = jax.device_get(state.params)
  rewards = []
  for it in range(14):
    scored, m = run(state, ids, mask, jax.random.key(it), ref_params=ref_params,
                    reward_params=None)
    state, um = update(cfg, state, scored)
    rewards.append(float(m["raw_score_mean"]))
    assert np.isfinite(float(um["loss"])) and float(um["nonfinite_steps"]) == 0
  # The master weights and Adam's moments stay float32; the update moved them.
  assert _float_dtypes(state.params) == {jnp.dtype(jnp.float32)}
  assert _float_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
  assert max(moved) > 1e-3
  assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.1, rewards


def test_frozen_models_stored_in_bf16(tokenizer, tmp_path):
  trainer, _ = tiny_ppo.trainer(tokenizer, tmp_path, max_steps=2, frozen_param_dtype="bfloat16",
                                eval_every=0)
  assert _float_dtypes(trainer.ref_params) == {jnp.dtype(jnp.bfloat16)}
  assert _float_dtypes(trainer.state.params) == {jnp.dtype(jnp.float32)}
  trainer.train()
  # The reference is the policy rounded to bfloat16: the first iteration's KL is small, not 0.
  assert abs(trainer.history[0]["kl"]) < 0.05
  assert all(np.isfinite(r["reward_mean"]) for r in trainer.history)


def test_bad_frozen_dtype_is_refused():
  from rlhf_jax.trainers.ppo import PPOTrainerConfig
  with pytest.raises(ValueError, match="frozen_param_dtype 'bf17' is not a dtype"):
    PPOTrainerConfig(frozen_param_dtype="bf17")
