"""Tests for rlhf_jax.trainers.reward and losses.bradley_terry_loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, losses, models, optim, sharding
from rlhf_jax.trainers import reward
from rlhf_jax.trainers import supervised as trainers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(data.vocabulary(), str(tmp_path_factory.mktemp("tok")))


def _model_cfg(tokenizer, num_layers=2):
  return models.DecoderConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32,
                              num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64)


def _neg_log_sigmoid(x: float) -> float:
  """-log sigmoid(x) = log(1 + exp(-x)), written so neither branch overflows."""
  return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def bt_reference(r_chosen, r_rejected, margin, center_coef):
  """(loss, accuracy, margin_mean) in float64, one pair at a time."""
  n = len(r_chosen)
  m = np.zeros(n) if margin is None else margin
  loss = sum(_neg_log_sigmoid(float(c) - float(r) - float(g))
             for c, r, g in zip(r_chosen, r_rejected, m)) / n
  loss += center_coef * sum((float(c) + float(r)) ** 2 for c, r in zip(r_chosen, r_rejected)) / n
  accuracy = sum(float(c) > float(r) for c, r in zip(r_chosen, r_rejected)) / n
  return loss, accuracy, sum(float(c) - float(r) for c, r in zip(r_chosen, r_rejected)) / n


@pytest.mark.parametrize("with_margin,center_coef", [(False, 0.0), (True, 0.0), (True, 0.05)])
def test_bradley_terry_matches_numpy(with_margin, center_coef):
  rng = np.random.default_rng(0)
  r_chosen = rng.normal(0.5, 2.0, 13).astype(np.float32)
  r_rejected = rng.normal(0.0, 2.0, 13).astype(np.float32)
  margin = rng.uniform(0.0, 1.0, 13).astype(np.float32) if with_margin else None
  loss, aux = losses.bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)
  want_loss, want_acc, want_margin = bt_reference(r_chosen, r_rejected, margin, center_coef)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], want_acc, rtol=1e-6)
  np.testing.assert_allclose(aux["margin_mean"], want_margin, rtol=1e-5, atol=1e-6)


def test_bradley_terry_is_finite_for_huge_gaps():
  r_chosen, r_rejected = jnp.array([1e4, -1e4, 3.0]), jnp.array([0.0, 0.0, 3.0])
  grad_fn = jax.value_and_grad(lambda c: losses.bradley_terry_loss(c, r_rejected)[0])
  loss, grad = grad_fn(r_chosen)
  np.testing.assert_allclose(loss, (0.0 + 1e4 + math.log(2.0)) / 3, rtol=1e-6)
  np.testing.assert_allclose(grad, [0.0, -1.0 / 3, -0.5 / 3], atol=1e-7)


def test_pair_scores_come_from_one_forward_at_the_eos(tokenizer):
  pairs = data.make_default_task(seed=2, n_sft=0, n_pairs=3, n_prompts=0,
                                 n_eval_prompts=8).preferences
  batch = reward.encode_pairs(tokenizer, pairs, reward.RewardConfig(max_len=20))
  model = models.ScalarModel(_model_cfg(tokenizer), rngs=nnx.Rngs(0), head_std=0.5)
  graphdef, params = nnx.split(model)

  @jax.jit
  def scores_and_per_token(params, batch):
    model = nnx.merge(graphdef, params)
    per_token = {side: model.per_token(batch[f"{side}_ids"],
                                       attention_mask=batch[f"{side}_attention_mask"])
                 for side in ("chosen", "rejected")}
    return reward.pair_scores(model, batch), per_token

  (r_chosen, r_rejected), per_token = scores_and_per_token(params, batch)
  for side, got in (("chosen", r_chosen), ("rejected", r_rejected)):
    ids, mask = batch[f"{side}_ids"], batch[f"{side}_attention_mask"]
    last = mask.sum(axis=1) - 1
    np.testing.assert_array_equal(ids[np.arange(3), last], tokenizer.eos_token_id)
    np.testing.assert_allclose(got, np.asarray(per_token[side])[np.arange(3), last], rtol=1e-5,
                               atol=1e-6)
  assert np.all(np.abs(np.asarray(r_chosen) - np.asarray(r_rejected)) > 0)


def test_reward_model_learns_held_out_preferences(tokenizer):
  pairs = data.make_default_task(seed=0, n_sft=0, n_pairs=2048, n_prompts=0,
                                 n_eval_prompts=8).preferences
  eval_pairs = data.make_default_task(seed=100, n_sft=0, n_pairs=1024, n_prompts=0,
                                      n_eval_prompts=8).preferences
  cfg = reward.RewardConfig(batch_size=32, epochs=4, max_len=20, log_every=16, eval_every=128,
                            optim=optim.OptimConfig(learning_rate=3e-3, schedule="cosine"))
  model = models.ScalarModel(_model_cfg(tokenizer, num_layers=1), rngs=nnx.Rngs(0))
  _, history, eval_metrics = reward.train_reward_model(model, tokenizer, pairs, cfg,
                                                       eval_pairs=eval_pairs)
  evals = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
  print(f"reward model held-out accuracy {evals} (1024 pairs), final train loss "
        f"{history[-1]['loss']:.3f}, {history[-1]['tokens_per_s']:.0f} tokens/s")
  assert eval_metrics["num_pairs"] == 1024
  assert eval_metrics["accuracy"] > 0.75
  assert eval_metrics["accuracy"] == evals[-1] and len(evals) == 2   # steps 128 and 256
  assert eval_metrics["loss"] < math.log(2.0) - 0.2
  assert np.mean([h["accuracy"] for h in history[-32:]]) > 0.8


def test_one_step_same_on_one_and_eight_devices(tokenizer):
  pairs = data.make_default_task(seed=1, n_sft=0, n_pairs=20, n_prompts=0,
                                 n_eval_prompts=8).preferences
  cfg = reward.RewardConfig(batch_size=16, epochs=1, max_len=20, eval_fraction=0.2,
                            center_coef=0.1, optim=optim.OptimConfig(learning_rate=1e-2))
  # A non-zero head so the first step also moves the decoder.
  model = models.ScalarModel(_model_cfg(tokenizer, num_layers=1), rngs=nnx.Rngs(0), head_std=0.5)

  def run(mesh):
    trained, history, eval_metrics = reward.train_reward_model(model, tokenizer, pairs, cfg,
                                                               mesh=mesh)
    return nnx.state(trained), history, eval_metrics

  one_params, one_hist, one_eval = run(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  eight_params, eight_hist, eight_eval = run(sharding.make_mesh((2, 2, 2)))
  assert len(one_hist) == len(eight_hist) == 1 and one_eval["num_pairs"] == 4
  assert len(eight_params["decoder"]["embed"][...].sharding.device_set) == 8
  for key in ("loss", "accuracy", "margin_mean", "grad_norm"):
    np.testing.assert_allclose(eight_hist[0][key], one_hist[0][key], atol=1e-5, rtol=1e-5,
                               err_msg=key)
  for key in one_eval:
    np.testing.assert_allclose(eight_eval[key], one_eval[key], atol=1e-5, rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.device_get(one_params), jax.device_get(eight_params))
  decoder_moved = jax.tree.map(lambda a, b: np.abs(a - b).max(),
                               jax.device_get(nnx.state(model)["decoder"]),
                               jax.device_get(one_params["decoder"]))
  assert max(jax.tree.leaves(decoder_moved)) > 1e-4


def test_multi_label_model_is_rejected(tokenizer):
  pairs = data.make_default_task(seed=1, n_sft=0, n_pairs=8, n_prompts=0,
                                 n_eval_prompts=8).preferences
  model = models.ScalarModel(_model_cfg(tokenizer).replace(num_labels=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_labels=1"):
    reward.train_reward_model(model, tokenizer, pairs, reward.RewardConfig(batch_size=4))


def test_microbatches_give_the_unsplit_step(tokenizer):
  pairs = data.make_default_task(seed=2, n_sft=0, n_pairs=16, n_prompts=0,
                                 n_eval_prompts=8).preferences
  batch = jax.device_put(reward.encode_pairs(tokenizer, pairs, reward.RewardConfig(max_len=20)))
  model = models.ScalarModel(_model_cfg(tokenizer), rngs=nnx.Rngs(0), head_std=0.5)
  graphdef, params = nnx.split(model)
  # Plain SGD, so the new params compare the gradients themselves (see ppo_test).
  tx = optax.sgd(0.1)
  opt_state = tx.init(params)
  loss_fn = functools.partial(reward.reward_batch_loss, center_coef=0.1)

  def run(micro_batch_size):
    step = trainers.make_train_step(loss_fn, graphdef, tx, micro_batch_size)
    return jax.device_get(jax.jit(step)(params, opt_state, batch))

  whole_params, _, whole = run(None)
  micro_params, _, micro = run(4)
  assert whole.keys() == micro.keys()
  for k in whole:
    np.testing.assert_allclose(micro[k], whole[k], atol=1e-6, rtol=1e-6, err_msg=k)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), whole_params, jax.device_get(params))
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), whole_params,
               micro_params)
