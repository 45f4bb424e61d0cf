"""Tests for rlhf_jax.rollout against a cache-free greedy loop and NumPy sampling references."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax import sharding

# The module, not the `rollout` function the package exports under its name.
R = importlib.import_module("rlhf_jax.rollout")

VOCAB = 32
CONFIGS = {
    "llama": models.DecoderConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=64),
    "gpt2": models.DecoderConfig(
        model_type="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=32,
        norm="layernorm", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
        positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_word_embeddings=True),
}
B, P, N = 8, 5, 6
PAD = 0
TEMPERATURE = 0.7


def _prompts(width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """B left-padded prompts of 1..P real tokens (ids >= 1), padded to `width` columns."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, P + 1, B)
  tokens = rng.integers(1, VOCAB, (B, P))
  mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, tokens, PAD)
  extra = width - P
  return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=PAD),
          np.pad(mask, ((0, 0), (extra, 0))))


@functools.lru_cache(maxsize=None)
def _jit_rollout(graphdef: nnx.GraphDef, cfg: R.SamplingConfig):
  """One jitted rollout per (model, config); jit re-specialises only on new shapes/shardings."""
  return jax.jit(functools.partial(R.rollout, graphdef, cfg=cfg))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_greedy(forward, ids: np.ndarray, mask: np.ndarray, eos: int, temperature: float):
  """Greedy decoding that re-runs the full, cache-free forward over the growing sequence.

  Each row stops after its first EOS and is padded from there on (finished rows keep growing with
  masked-out padding, which no other row can see).
  """
  b = ids.shape[0]
  seq, seq_mask = ids, mask
  tokens = np.full((b, N), PAD)
  completion_mask = np.zeros((b, N), np.float32)
  logprobs = np.zeros((b, N))
  done = np.zeros(b, bool)
  for t in range(N):
    logits = np.asarray(forward(seq, seq_mask))[:, -1] / temperature
    logp = _log_softmax(logits)
    for i in range(b):
      if not done[i]:
        tok = int(np.argmax(logits[i]))
        tokens[i, t], logprobs[i, t], completion_mask[i, t] = tok, logp[i, tok], 1.0
        done[i] = tok == eos
    seq = np.concatenate([seq, tokens[:, t:t + 1]], axis=1)
    seq_mask = np.concatenate([seq_mask, completion_mask[:, t:t + 1].astype(mask.dtype)], axis=1)
  return tokens, completion_mask, logprobs


def _pick_eos(tokens: np.ndarray) -> int:
  """A token that ends some greedy rows mid-completion while another row never emits it."""
  for tok in range(VOCAB):
    if tok == PAD:
      continue
    first = [int(np.argmax(row == tok)) if np.any(row == tok) else None for row in tokens]
    if None in first and any(f is not None and 1 <= f <= N - 2 for f in first):
      return tok
  raise AssertionError(f"no usable EOS in greedy completions {tokens}")


@functools.lru_cache(maxsize=None)
def _greedy_case(family: str) -> tuple[nnx.GraphDef, nnx.State, R.SamplingConfig,
                                        tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(graphdef, params, greedy SamplingConfig, reference (tokens, mask, logprobs)) of a family.

  EOS is chosen from the EOS-free greedy completions so that some rows end mid-completion and at
  least one runs to max_new_tokens.
  """
  graphdef, params = nnx.split(models.CausalLM(CONFIGS[family], rngs=nnx.Rngs(0)))
  # The reference recompiles for every sequence length; unoptimised XLA compiles twice as fast.
  forward = jax.jit(lambda ids, m: nnx.merge(graphdef, params)(ids, attention_mask=m)[0],
                    compiler_options={"xla_backend_optimization_level": 0})
  ids, mask = _prompts(P)
  eos = _pick_eos(_reference_greedy(forward, ids, mask, eos=-1, temperature=TEMPERATURE)[0])
  cfg = R.SamplingConfig(max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD,
                         temperature=TEMPERATURE, greedy=True)
  return graphdef, params, cfg, _reference_greedy(forward, ids, mask, eos, TEMPERATURE)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_cache_free_reference(family):
  graphdef, params, cfg, (ref_tokens, ref_mask, ref_logprobs) = _greedy_case(family)
  ids, mask = _prompts(P)
  out = _jit_rollout(graphdef, cfg)(params, ids, mask, jax.random.key(0))
  assert out.completion_ids.dtype == jnp.int32 and out.completion_mask.dtype == jnp.float32
  np.testing.assert_array_equal(out.completion_ids, ref_tokens)
  np.testing.assert_array_equal(out.completion_mask, ref_mask)
  np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=1e-5)
  # The case must exercise both endings: EOS followed by padding, and a cut at max_new_tokens.
  has_eos = (ref_tokens == cfg.eos_token_id).any(axis=1)
  assert has_eos.any() and not has_eos.all()
  assert (ref_mask.sum(axis=1) < N).any()
  np.testing.assert_array_equal(out.prompt_ids, ids)
  np.testing.assert_array_equal(out.sequences[:, P:], ref_tokens)
  np.testing.assert_array_equal(out.sequence_mask, np.concatenate([mask, ref_mask], axis=1))


def test_left_padding_width_does_not_change_results():
  graphdef, params, cfg, _ = _greedy_case("llama")
  run = _jit_rollout(graphdef, cfg)
  narrow = run(params, *_prompts(P), jax.random.key(0))
  wide = run(params, *_prompts(P + 4), jax.random.key(0))
  np.testing.assert_array_equal(wide.completion_ids, narrow.completion_ids)
  np.testing.assert_array_equal(wide.completion_mask, narrow.completion_mask)
  np.testing.assert_allclose(wide.logprobs, narrow.logprobs, atol=1e-5)


def _reference_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Kept-token mask of HF-style top-k then top-p (nucleus) filtering, by sort and cumsum."""
  keep = np.ones(logits.shape, bool)
  for i, row in enumerate(logits.astype(np.float64)):
    if top_k > 0:
      keep[i] = False
      keep[i, np.argsort(-row)[:top_k]] = True
    if top_p < 1.0:
      probs = np.where(keep[i], np.exp(row - row.max()), 0.0)
      probs /= probs.sum()
      order = np.argsort(-probs)
      cum = np.cumsum(probs[order])
      assert np.min(np.abs(cum - top_p)) > 1e-5, "ill-posed case: cumulative mass on top_p"
      size = int(np.searchsorted(cum, top_p)) + 1  # first prefix whose mass reaches top_p
      keep[i] = False
      keep[i, order[:size]] = True
  return keep


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (3, 1.0), (7, 1.0), (0, 0.3), (0, 0.75),
                                         (0, 0.95), (5, 0.6), (10, 0.9)])
def test_keep_mask_matches_sort_cumsum_reference(top_k, top_p):
  logits = np.random.default_rng(1).normal(0.0, 2.0, (16, 32)).astype(np.float32)
  kept = np.asarray(R.keep_mask(jnp.asarray(logits), top_k, top_p))
  np.testing.assert_array_equal(kept, _reference_filter(logits, top_k, top_p))
  if top_k > 0 and top_p == 1.0:
    np.testing.assert_array_equal(kept.sum(axis=1), top_k)


SAMPLES = 40_000


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.6, 0, 1.0),
                                                     (1.3, 4, 1.0), (0.8, 0, 0.7),
                                                     (0.9, 6, 0.8)])
def test_sampling_frequencies_match_tempered_truncated_softmax(temperature, top_k, top_p):
  row = np.random.default_rng(2).normal(0.0, 1.5, 10).astype(np.float32)
  cfg = R.SamplingConfig(max_new_tokens=1, eos_token_id=1, pad_token_id=0,
                         temperature=temperature, top_k=top_k, top_p=top_p)
  logits = jnp.tile(jnp.asarray(row), (SAMPLES, 1))
  # Eager: its ops compile once per shape and are shared by all configs, unlike one jit per config.
  tokens, logprobs = R.sample_token(jax.random.key(3), logits, cfg)
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  assert tokens.dtype == np.int32
  scaled = row.astype(np.float64) / temperature
  keep = _reference_filter(scaled[None].astype(np.float32), top_k, top_p)[0]
  expected = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  expected /= expected.sum()
  freq = np.bincount(tokens, minlength=row.size) / SAMPLES
  # Tokens outside the kept set are never drawn; the rest are within 5 binomial sigmas.
  assert np.all(freq[~keep] == 0.0)
  sigma = np.sqrt(expected * (1 - expected) / SAMPLES)
  np.testing.assert_array_less(np.abs(freq - expected), 5 * sigma + 1e-12)
  # Log-probs are those of the tempered distribution before truncation (what `score` recomputes).
  np.testing.assert_allclose(logprobs, _log_softmax(scaled)[tokens], atol=1e-5)


def test_inverse_cdf_categorical_matches_weights_across_blocks():
  # 300 entries: three CDF blocks, the last one partly padding; zero weights (a filtered vocabulary)
  # inside a block, a whole zero block-sized stretch, and mass concentrated at both ends.
  v = 3 * R._CDF_BLOCK - 84
  rng = np.random.default_rng(5)
  weights = rng.gamma(0.3, 1.0, v).astype(np.float32)
  weights[10:40] = 0.0
  weights[R._CDF_BLOCK:2 * R._CDF_BLOCK] = 0.0
  weights[-1] = weights[0] = 3.0 * weights.max()
  expected = weights / weights.astype(np.float64).sum()
  tokens = np.asarray(R.categorical(jax.random.key(7), jnp.tile(jnp.asarray(weights),
                                                                (SAMPLES, 1))))
  freq = np.bincount(tokens, minlength=v) / SAMPLES
  assert tokens.min() >= 0 and tokens.max() < v
  assert np.all(freq[weights == 0] == 0.0)
  sigma = np.sqrt(expected * (1 - expected) / SAMPLES)
  np.testing.assert_array_less(np.abs(freq - expected), 5 * sigma + 1e-12)
  # A row with a single positive weight always draws it, even where it is the row's last entry.
  one_hot = jnp.zeros((4, v)).at[:, v - 1].set(1e-30)
  np.testing.assert_array_equal(R.categorical(jax.random.key(0), one_hot), v - 1)


def test_greedy_sample_token_is_argmax_with_tempered_logprob():
  logits = np.random.default_rng(4).normal(0.0, 1.0, (6, 32)).astype(np.float32)
  cfg = R.SamplingConfig(max_new_tokens=1, eos_token_id=1, pad_token_id=0, temperature=0.5,
                         greedy=True)
  tokens, logprobs = R.sample_token(jax.random.key(0), jnp.asarray(logits), cfg)
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
  np.testing.assert_allclose(logprobs, _log_softmax(logits / 0.5)[np.arange(6), logits.argmax(-1)],
                             atol=1e-5)


def test_sampling_config_validation():
  with pytest.raises(ValueError, match="pad_token_id must differ"):
    R.SamplingConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=2)
  with pytest.raises(ValueError, match="temperature"):
    R.SamplingConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=0, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    R.SamplingConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=0, top_p=0.0)


_FORWARD_CALLS: list[int] = []


class _CountingLM(models.CausalLM):
  """A CausalLM that records each forward it runs, at run time (inside jit and while_loop)."""

  def __call__(self, *args, **kwargs):
    jax.debug.callback(lambda: _FORWARD_CALLS.append(1))
    return super().__call__(*args, **kwargs)


def test_decode_loop_stops_once_every_row_has_emitted_eos():
  eos, max_new = 2, 16
  model = _CountingLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
  # Embedding dimension 0 dominates every hidden state, so lm_head[0, eos] sets p(EOS) ~ 0.49 at
  # every step: rows end after a few random steps, all well before max_new_tokens.
  model.decoder.embed[:, 0] = 10.0
  model.lm_head[0, eos] = 0.6
  graphdef, params = nnx.split(model)
  cfg = R.SamplingConfig(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
  run = _jit_rollout(graphdef, cfg)
  ids, mask = _prompts(P)
  _FORWARD_CALLS.clear()
  out = jax.block_until_ready(run(params, ids, mask, jax.random.key(1)))
  jax.effects_barrier()
  tokens, cmask, logprobs = map(np.asarray, (out.completion_ids, out.completion_mask, out.logprobs))
  assert (tokens == eos).any(axis=1).all()
  first_eos = np.argmax(tokens == eos, axis=1)
  assert first_eos.max() < max_new - 2 and len(set(first_eos)) > 1
  # One prefill (which gives token 0), then one decode step per token up to the last row's EOS,
  # and none after it.
  assert len(_FORWARD_CALLS) == 1 + first_eos.max()
  after = np.arange(max_new)[None] > first_eos[:, None]
  np.testing.assert_array_equal(cmask, (~after).astype(np.float32))
  np.testing.assert_array_equal(tokens[after], PAD)
  np.testing.assert_array_equal(logprobs[after], 0.0)
  assert np.all(logprobs[~after] < 0.0)


@pytest.mark.parametrize("greedy", [True, False])
def test_batch_sharded_over_8_devices_matches_single_device(greedy):
  graphdef, params, cfg, (greedy_tokens, _, _) = _greedy_case("llama")
  if not greedy:
    cfg = R.SamplingConfig(max_new_tokens=N, eos_token_id=cfg.eos_token_id, pad_token_id=PAD,
                           temperature=TEMPERATURE, top_k=20, top_p=0.95)
  run = _jit_rollout(graphdef, cfg)
  ids, mask = _prompts(P)
  key = jax.random.key(5)
  single = run(params, ids, mask, key)
  # Batch over data x fsdp (8 ways) and the embedding dimension of the weights over fsdp.
  mesh = sharding.make_mesh((4, 2, 1))
  rows = sharding.batch_sharding(mesh, 2)
  sharded_ids, sharded_mask = jax.device_put((jnp.asarray(ids), jnp.asarray(mask)), rows)
  sharded_params = jax.device_put(params, sharding.param_shardings(params, mesh))
  assert len(sharded_ids.sharding.device_set) == 8
  multi = run(sharded_params, sharded_ids, sharded_mask,
              jax.device_put(key, sharding.replicated(mesh)))
  np.testing.assert_array_equal(multi.completion_ids, single.completion_ids)
  np.testing.assert_array_equal(multi.completion_mask, single.completion_mask)
  np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-5)
  with jax.set_mesh(mesh):   # the model's activations pinned by their logical axes
    pinned = jax.jit(functools.partial(R.rollout, graphdef, cfg=cfg))(
        sharded_params, sharded_ids, sharded_mask, jax.device_put(key, sharding.replicated(mesh)))
  np.testing.assert_array_equal(pinned.completion_ids, single.completion_ids)
  np.testing.assert_allclose(pinned.logprobs, single.logprobs, atol=1e-5)
  if not greedy:
    assert not np.array_equal(single.completion_ids, greedy_tokens)



def test_gathered_weights_give_the_same_rollout():
  """`gather_weights` (the weights all-gathered over fsdp once, before the prefill) changes the
  layout, not the numbers. (That no decode step gathers: tests/scale_test.py.)"""
  graphdef, params, cfg, _ = _greedy_case("llama")
  cfg = R.SamplingConfig(max_new_tokens=N, eos_token_id=cfg.eos_token_id, pad_token_id=PAD,
                         temperature=TEMPERATURE)
  mesh = sharding.make_mesh((1, 4, 2))
  ids, mask = jax.device_put(tuple(map(jnp.asarray, _prompts(P))), sharding.batch_sharding(mesh, 2))
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  key = jax.device_put(jax.random.key(5), sharding.replicated(mesh))
  out = {}
  for gather in (False, True):
    run = jax.jit(functools.partial(R.rollout, graphdef,
                                    cfg=dataclasses.replace(cfg, gather_weights=gather)))
    with jax.set_mesh(mesh):
      out[gather] = run(params, ids, mask, key)
  np.testing.assert_array_equal(out[True].completion_ids, out[False].completion_ids)
  np.testing.assert_allclose(out[True].logprobs, out[False].logprobs, atol=1e-5)
