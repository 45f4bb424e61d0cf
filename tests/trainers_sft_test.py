"""Tests for rlhf_jax.trainers.sft, losses.sft_loss and the shared loop helpers."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import data, losses, models, optim, sharding
from rlhf_jax.data import batching
from rlhf_jax.trainers import supervised as trainers
from rlhf_jax.trainers import sft

B, T, V = 4, 7, 9


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(data.vocabulary(), str(tmp_path_factory.mktemp("tok")))


def _model_cfg(tokenizer, num_layers=2):
  return models.DecoderConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32,
                              num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64)


def _loss_batch(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 2.0, (B, T, V)).astype(np.float32)
  ids = rng.integers(0, V, (B, T)).astype(np.int32)
  # Row layout [prompt | completion | pad]; row 2 has no completion at all.
  starts, ends = (2, 1, 3, 4), (6, 7, 3, 5)
  mask = np.array([[s <= t < e for t in range(T)] for s, e in zip(starts, ends)], np.float32)
  return logits, ids, mask


def sft_reference(logits, ids, mask):
  """(mean NLL, accuracy, count) over positions t whose target ids[t+1] is a completion token."""
  nll, correct, count = 0.0, 0, 0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1] - 1):
      if not mask[b, t + 1]:
        continue
      row = logits[b, t].astype(np.float64)
      log_z = row.max() + math.log(np.exp(row - row.max()).sum())
      nll -= row[ids[b, t + 1]] - log_z
      correct += int(np.argmax(row) == ids[b, t + 1])
      count += 1
  return nll / count, correct / count, count


def test_sft_loss_matches_numpy():
  logits, ids, mask = _loss_batch()
  loss, aux = jax.jit(losses.sft_loss)(logits, ids, mask)
  want_loss, want_acc, want_n = sft_reference(logits, ids, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["token_accuracy"], want_acc, rtol=1e-6)
  assert aux["num_tokens"] == want_n


def test_sft_loss_ignores_prompt_and_padding_targets():
  logits, ids, mask = _loss_batch()
  rng = np.random.default_rng(1)
  other_ids = np.where(mask > 0, ids, rng.integers(0, V, ids.shape)).astype(np.int32)
  assert (other_ids != ids).any()
  loss_fn = jax.jit(jax.value_and_grad(lambda lg, i, m: losses.sft_loss(lg, i, m)[0]))
  loss, grad = loss_fn(logits, ids, mask)
  other_loss, other_grad = loss_fn(logits, other_ids, mask)
  assert loss == other_loss
  np.testing.assert_array_equal(grad, other_grad)
  # Logits at positions whose next token is not a completion token get no gradient.
  not_counted = np.concatenate([mask[:, 1:], np.zeros((B, 1))], axis=1) == 0
  assert not np.any(np.asarray(grad)[not_counted])


def test_split_and_shuffles_are_deterministic_partitions():
  train, held_out = trainers.split_indices(100, 0.1, seed=3)
  assert len(held_out) == 10
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])), np.arange(100))
  np.testing.assert_array_equal(trainers.split_indices(100, 0.1, seed=3)[1], held_out)
  assert not np.array_equal(trainers.split_indices(100, 0.1, seed=4)[1], held_out)
  assert len(trainers.split_indices(100, 0.001, seed=0)[1]) == 1
  epoch0 = batching.epoch_batches(10, 3, seed=0, epoch=0)
  assert epoch0.shape == (3, 3) and len(np.unique(epoch0)) == 9
  np.testing.assert_array_equal(batching.epoch_batches(10, 3, seed=0, epoch=0), epoch0)
  assert not np.array_equal(batching.epoch_batches(10, 3, seed=0, epoch=1), epoch0)


def test_sft_lowers_held_out_completion_loss(tokenizer):
  task = data.make_default_task(seed=0, n_sft=576, n_pairs=0, n_prompts=0, n_eval_prompts=8)
  train_examples, eval_examples = task.sft[:512], task.sft[512:]
  cfg = sft.SFTConfig(batch_size=32, epochs=3, max_len=20, log_every=5,
                      optim=optim.OptimConfig(learning_rate=1e-2, schedule="cosine"))
  model = models.CausalLM(_model_cfg(tokenizer, num_layers=1), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  before = jax.device_get(params)
  initial = sft.make_evaluator(graphdef, sft.encode_examples(tokenizer, eval_examples, cfg),
                               cfg.batch_size, None)(params)
  logged = []
  trained, history = sft.train_sft(model, tokenizer, train_examples, cfg,
                                   log_fn=lambda step, m: logged.append((step, m)),
                                   eval_examples=eval_examples)
  final = history[-1]
  print(f"SFT held-out loss {initial['loss']:.3f} -> {final['eval_loss']:.3f}, token accuracy "
        f"{initial['token_accuracy']:.3f} -> {final['eval_token_accuracy']:.3f}, "
        f"{final['tokens_per_s']:.0f} tokens/s")
  assert abs(initial["loss"] - math.log(len(tokenizer))) < 0.1   # a fresh model is near uniform
  assert final["eval_loss"] < 0.7 * initial["loss"]
  assert final["eval_token_accuracy"] > 0.4
  assert final["eval_num_tokens"] == initial["num_tokens"]
  assert history[-1]["loss"] < 0.7 * history[0]["loss"]
  assert [h["step"] for h in history] == list(range(1, 3 * 16 + 1))
  assert [s for s, _ in logged] == list(range(5, 48, 5)) + [48]
  assert logged[-1][1] == final
  assert history[-1]["learning_rate"] < history[0]["learning_rate"]
  assert all(h["tokens_per_s"] > 0 for h in history)
  # The caller's model is untouched (its buffers were not donated); the returned one changed.
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(nnx.state(model)))
  assert not np.allclose(before["lm_head"][...], nnx.state(trained)["lm_head"][...])


def test_one_step_same_on_one_and_eight_devices(tokenizer):
  examples = data.make_default_task(seed=1, n_sft=20, n_pairs=0, n_prompts=0,
                                    n_eval_prompts=8).sft
  cfg = sft.SFTConfig(batch_size=16, epochs=1, max_len=20, eval_fraction=0.2,
                      optim=optim.OptimConfig(learning_rate=1e-2))
  model = models.CausalLM(_model_cfg(tokenizer, num_layers=1), rngs=nnx.Rngs(0))

  def run(mesh):
    trained, history = sft.train_sft(model, tokenizer, examples, cfg, mesh=mesh)
    return nnx.state(trained), history

  one_params, one_hist = run(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  eight_params, eight_hist = run(sharding.make_mesh((2, 2, 2)))
  assert len(one_hist) == len(eight_hist) == 1
  assert len(eight_params["decoder"]["embed"][...].sharding.device_set) == 8
  for key in ("loss", "token_accuracy", "grad_norm", "eval_loss", "eval_token_accuracy"):
    np.testing.assert_allclose(eight_hist[0][key], one_hist[0][key], atol=1e-5, rtol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.device_get(one_params), jax.device_get(eight_params))
  with pytest.raises(ValueError, match="batch_size=6 is not a multiple"):
    sft.train_sft(model, tokenizer, examples, sft.SFTConfig(batch_size=6, max_len=20),
                  mesh=sharding.make_mesh((2, 2, 2)))


def test_token_ids_outside_the_model_vocab_are_rejected(tokenizer):
  examples = data.make_default_task(seed=1, n_sft=8, n_pairs=0, n_prompts=0,
                                    n_eval_prompts=8).sft
  small = _model_cfg(tokenizer).replace(vocab_size=16)
  with pytest.raises(ValueError, match="vocab_size is 16"):
    sft.train_sft(models.CausalLM(small, rngs=nnx.Rngs(0)), tokenizer, examples,
                  sft.SFTConfig(batch_size=4, max_len=20))


def test_microbatches_give_the_unsplit_step(tokenizer):
  examples = data.make_default_task(seed=2, n_sft=16, n_pairs=0, n_prompts=0,
                                    n_eval_prompts=8).sft
  cfg = sft.SFTConfig(batch_size=16, max_len=20)
  batch = jax.device_put(sft.encode_examples(tokenizer, examples, cfg))
  targets = np.asarray(batch["completion_mask"])[:, 1:].sum(axis=1)
  assert len(set(targets)) > 2   # ragged: token weighting matters
  graphdef, params = nnx.split(models.CausalLM(_model_cfg(tokenizer), rngs=nnx.Rngs(0)))
  # Plain SGD, so the new params compare the gradients themselves (see ppo_test).
  tx = optax.sgd(1.0)
  opt_state = tx.init(params)

  def run(micro_batch_size):
    step = trainers.make_train_step(sft.sft_batch_loss, graphdef, tx, micro_batch_size,
                                    sft.sft_batch_targets)
    return jax.device_get(jax.jit(step)(params, opt_state, batch))

  whole_params, _, whole = run(None)
  micro_params, _, micro = run(4)
  assert whole.keys() == micro.keys() and whole["num_tokens"] == targets.sum()
  for k in whole:
    np.testing.assert_allclose(micro[k], whole[k], atol=1e-6, rtol=1e-6, err_msg=k)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), whole_params, jax.device_get(params))
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), whole_params,
               micro_params)


def test_microbatch_size_must_divide_the_batch():
  with pytest.raises(ValueError, match="micro_batch_size=3 does not divide batch_size=8"):
    sft.SFTConfig(batch_size=8, micro_batch_size=3)
  with pytest.raises(ValueError, match="micro_batch_size=0 does not divide"):
    sft.SFTConfig(batch_size=8, micro_batch_size=0)
