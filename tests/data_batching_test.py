"""Tests for rlhf_jax.data.batching: widths, plans, trimming, and that a trimmed batch trains as
the full-width one does (the SFT and Bradley-Terry losses, their gradients, and `fit`)."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data, models, optim
from rlhf_jax.data import batching
from rlhf_jax.trainers import reward, sft


def _right_padded(lengths, width, rng):
  """{"ids", "attention_mask"} rows of the given lengths, right padded to `width`."""
  mask = (np.arange(width) < np.asarray(lengths)[:, None]).astype(np.int32)
  return {"ids": rng.integers(3, 50, mask.shape).astype(np.int32) * mask,
          "attention_mask": mask}


def _padded_slots(lengths, widths):
  """sum_rows (w(l) - l), w(l) the smallest width >= l: a plain loop."""
  return sum(min(w for w in widths if w >= l) - l for l in lengths)


def test_row_lengths_are_the_last_real_column_of_any_mask():
  rng = np.random.default_rng(0)
  chosen, rejected = rng.integers(0, 12, 9), rng.integers(0, 12, 9)
  a, b = _right_padded(chosen, 12, rng), _right_padded(rejected, 12, rng)
  arrays = {"chosen_ids": a["ids"], "chosen_attention_mask": a["attention_mask"],
            "rejected_ids": b["ids"], "rejected_attention_mask": b["attention_mask"],
            "margin": rng.normal(size=9)}
  want = [max(c, r) for c, r in zip(chosen, rejected)]
  np.testing.assert_array_equal(batching.row_lengths(arrays), want)
  holey = {"attention_mask": np.array([[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])}
  np.testing.assert_array_equal(batching.row_lengths(holey), [4, 0])
  assert batching.full_width(arrays) == 12


@pytest.mark.parametrize("seed", range(4))
def test_widths_are_the_least_padding_choice(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 61, 40)
  cands = sorted({min(-(-l // 8) * 8, 60) for l in lengths})
  for k in (1, 2, 3, 4):
    widths = batching.bucket_widths(lengths, k, 60)
    if k == 1:
      assert widths == (60,)
      continue
    # brute force over every set of k candidates that holds the longest row
    best = min(_padded_slots(lengths, s + (cands[-1],))
               for s in itertools.combinations(cands[:-1], min(k, len(cands)) - 1))
    assert len(widths) <= k and widths == tuple(sorted(set(widths)))
    assert widths[-1] == cands[-1] and all(w % 8 == 0 or w == 60 for w in widths)
    assert _padded_slots(lengths, widths) == best


def test_widths_reject_rows_wider_than_the_arrays():
  with pytest.raises(ValueError, match="exceeds max_width=16"):
    batching.bucket_widths(np.array([3, 17]), 4, 16)
  with pytest.raises(ValueError, match="num_widths must be >= 1"):
    batching.bucket_widths(np.array([3]), 0, 16)


@pytest.mark.parametrize("group", [False, True])
def test_an_epoch_visits_every_kept_row_once_at_a_width_holding_it(group):
  rng = np.random.default_rng(1)
  lengths = np.minimum(np.exp(rng.normal(3.0, 0.8, 203)).astype(int) + 1, 200)
  widths = batching.bucket_widths(lengths, 4, 200)
  for epoch in range(3):
    steps = batching.epoch_plan(lengths, 16, widths, seed=5, epoch=epoch, group_by_length=group)
    expected = batching.epoch_batches(203, 16, seed=5, epoch=epoch)
    rows = np.stack([s.rows for s in steps])
    assert rows.shape == (12, 16) and all(s.epoch == epoch for s in steps)
    # the same 192 rows as the plain shuffle keeps (203 mod 16 dropped), each once
    np.testing.assert_array_equal(np.sort(rows.ravel()), np.sort(expected.ravel()))
    for s in steps:
      assert s.width in widths and s.width >= lengths[s.rows].max()
      assert s.width == min(w for w in widths if w >= lengths[s.rows].max())
    if group:   # batches mixing two widths: at most one per boundary between widths
      buckets = [set(np.searchsorted(widths, lengths[s.rows])) for s in steps]
      assert sum(len(b) > 1 for b in buckets) <= len(widths) - 1
    else:
      np.testing.assert_array_equal(rows, expected)


def test_plans_are_deterministic_and_reshuffled_every_epoch():
  rng = np.random.default_rng(2)
  lengths = rng.integers(1, 100, 64)
  widths = batching.bucket_widths(lengths, 3, 100)
  run = lambda seed: list(batching.plan(lengths, 8, widths, seed, epochs=2, group_by_length=True))
  a, b = run(0), run(0)
  assert len(a) == 16 and [s.epoch for s in a] == [0] * 8 + [1] * 8
  for x, y in zip(a, b):
    assert x.epoch == y.epoch and x.width == y.width
    np.testing.assert_array_equal(x.rows, y.rows)
  assert not np.array_equal(np.stack([s.rows for s in a[:8]]), np.stack([s.rows for s in a[8:]]))
  assert not np.array_equal(np.stack([s.rows for s in run(1)]), np.stack([s.rows for s in a]))
  # one width: the plain shuffle exactly, however the rows are grouped
  for group in (False, True):
    plain = batching.epoch_plan(lengths, 8, (100,), seed=0, epoch=1, group_by_length=group)
    np.testing.assert_array_equal(np.stack([s.rows for s in plain]),
                                  batching.epoch_batches(64, 8, seed=0, epoch=1))
    assert {s.width for s in plain} == {100}


def test_trim_cuts_only_the_padding_columns():
  rng = np.random.default_rng(3)
  arrays = _right_padded([5, 2, 7], 12, rng)
  arrays.update(completion_mask=arrays["attention_mask"].copy(), score=np.ones(3))
  cut = batching.trim(arrays, 8)
  assert cut["ids"].shape == cut["completion_mask"].shape == (3, 8) and cut["score"].shape == (3,)
  np.testing.assert_array_equal(cut["ids"], arrays["ids"][:, :8])
  assert batching.token_counts(cut) == (14, 24)
  assert batching.token_counts(arrays) == (14, 36)
  with pytest.raises(ValueError, match="longer than the widest width 6"):
    batching.width_of(np.array([7]), (4, 6))


# --- a trimmed batch trains as its full-width rows do --------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(data.vocabulary(), str(tmp_path_factory.mktemp("tok")))


def _model_cfg(tokenizer):
  return models.DecoderConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32,
                              num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64)


def _loss_and_grads(loss_fn, model, batch):
  graphdef, params = nnx.split(model)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0]))
  return jax.device_get(fn(params, batch))


def _assert_same_loss_and_grads(loss_fn, model, arrays):
  width = batching.width_of(batching.row_lengths(arrays), (8, 16, 24, 40))
  assert width < batching.full_width(arrays)
  full_loss, full_grads = _loss_and_grads(loss_fn, model, arrays)
  cut_loss, cut_grads = _loss_and_grads(loss_fn, model, batching.trim(arrays, width))
  np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               cut_grads, full_grads)


def test_trimmed_sft_batch_gives_the_full_width_loss_and_gradient(tokenizer):
  examples = data.make_default_task(seed=0, n_sft=8, n_pairs=0, n_prompts=0,
                                    n_eval_prompts=8).sft
  arrays = sft.encode_examples(tokenizer, examples, sft.SFTConfig(max_len=40))
  model = models.CausalLM(_model_cfg(tokenizer), rngs=nnx.Rngs(0))
  _assert_same_loss_and_grads(sft.sft_batch_loss, model, arrays)


def test_trimmed_pair_batch_gives_the_full_width_loss_and_gradient(tokenizer):
  pairs = data.make_default_task(seed=1, n_sft=0, n_pairs=8, n_prompts=0,
                                 n_eval_prompts=8).preferences
  arrays = reward.encode_pairs(tokenizer, pairs, reward.RewardConfig(max_len=40))
  model = models.ScalarModel(_model_cfg(tokenizer), rngs=nnx.Rngs(0), head_std=0.5)
  _assert_same_loss_and_grads(
      lambda m, b: reward.reward_batch_loss(m, b, center_coef=0.1), model, arrays)


def test_fit_with_trimmed_batches_follows_the_fixed_width_run(tokenizer):
  """Same batches (group_by_length off), trimmed or not: the same losses, evaluation and
  parameters up to float rounding; grouped by length, every step is narrower or as wide."""
  pairs = data.make_default_task(seed=0, n_sft=0, n_pairs=104, n_prompts=0,
                                 n_eval_prompts=8).preferences
  model = models.ScalarModel(_model_cfg(tokenizer), rngs=nnx.Rngs(0), head_std=0.5)
  runs = {}
  for name, buckets, group in (("fixed", 1, False), ("trim", 2, False), ("group", 2, True)):
    cfg = reward.RewardConfig(batch_size=8, epochs=2, max_len=40, eval_fraction=0.25,
                              length_buckets=buckets, group_by_length=group, log_every=4,
                              optim=optim.OptimConfig(learning_rate=3e-3))
    trained, history, eval_metrics = reward.train_reward_model(model, tokenizer, pairs, cfg)
    runs[name] = nnx.state(trained), history, eval_metrics
  (fixed_params, fixed, fixed_eval), (trim_params, trim, trim_eval) = runs["fixed"], runs["trim"]
  assert len(fixed) == len(trim) == 2 * (78 // 8)
  assert {h["batch_width"] for h in fixed} == {40}
  assert all(h["batch_width"] < 40 for h in trim)
  for f, t in zip(fixed, trim):
    np.testing.assert_allclose(t["loss"], f["loss"], rtol=1e-4, atol=1e-5)
    # the same real tokens in fewer slots
    assert (1 - t["padding_fraction"]) * t["batch_width"] == pytest.approx(
        (1 - f["padding_fraction"]) * f["batch_width"])
  for key in fixed_eval:
    np.testing.assert_allclose(trim_eval[key], fixed_eval[key], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               jax.device_get(trim_params), jax.device_get(fixed_params))
  group = runs["group"][1]
  assert np.mean([h["padding_fraction"] for h in group]) < np.mean(
      [h["padding_fraction"] for h in trim])
  assert all(np.isfinite(h["loss"]) for h in group)
