"""Tests for rlhf_jax.score against a NumPy transcription of its formulas."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import kl as kl_lib
from rlhf_jax import models
from rlhf_jax.masked import last_valid_index
from rlhf_jax.ppo import PPOConfig
# The modules, not the `rollout` and `score` functions the package exports under their names.
R = importlib.import_module("rlhf_jax.rollout")
S = importlib.import_module("rlhf_jax.score")

LLAMA = models.DecoderConfig(
    model_type="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, intermediate_size=64)
GPT2 = models.DecoderConfig(
    model_type="gpt2", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
    head_dim=8, intermediate_size=64, max_position_embeddings=32, norm="layernorm", norm_eps=1e-5,
    activation="gelu_new", gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True,
    mlp_bias=True, tie_word_embeddings=True)
EOS, PAD = 2, 0
B, P, N = 6, 4, 6
# First EOS index per row (None: cut at max_new_tokens).
EOS_AT = (2, 0, 5, None, 3, None)
PROMPT_LENGTHS = (4, 1, 3, 2, 4, 3)
# The token a rule-based reward counts; planted so that its share differs between rows.
TARGET = 7


def _rollout(temperature: float = 1.0) -> R.Rollout:
  """A hand-built rollout: left-padded prompts, EOS at EOS_AT, padding after it, some TARGETs;
  it says it was sampled at `temperature`."""
  rng = np.random.default_rng(0)
  prompt_mask = (np.arange(P)[None] >= P - np.asarray(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  prompt_ids = np.where(prompt_mask > 0, rng.integers(3, 32, (B, P)), PAD)
  ids = rng.integers(3, 32, (B, N))
  ids[0, 0], ids[2, 1:3], ids[3, :4] = TARGET, TARGET, TARGET
  mask = np.ones((B, N), np.float32)
  for i, e in enumerate(EOS_AT):
    if e is not None:
      ids[i, e], ids[i, e + 1:], mask[i, e + 1:] = EOS, PAD, 0.0
  logprobs = -rng.uniform(0.05, 3.0, (B, N)) * mask
  return R.Rollout(prompt_ids=jnp.asarray(prompt_ids, jnp.int32),
                   prompt_mask=jnp.asarray(prompt_mask),
                   completion_ids=jnp.asarray(ids, jnp.int32),
                   completion_mask=jnp.asarray(mask),
                   logprobs=jnp.asarray(logprobs, jnp.float32),
                   sampling=R.SamplingConfig(max_new_tokens=N, temperature=temperature,
                                             eos_token_id=EOS, pad_token_id=PAD))


@functools.lru_cache(maxsize=None)
def _models():
  """(ref graphdef, params, reward graphdef, params): Llama reference policy, GPT-2 reward model."""
  ref_graphdef, ref_params = nnx.split(models.CausalLM(LLAMA, rngs=nnx.Rngs(1)))
  reward_graphdef, reward_params = nnx.split(
      models.ScalarModel(GPT2, rngs=nnx.Rngs(2), head_std=0.5))
  return ref_graphdef, ref_params, reward_graphdef, reward_params


@functools.lru_cache(maxsize=None)
def _full_forwards():
  """Reference logits [B, P+N, V] and reward-head outputs at every position [B, P+N] (NumPy)."""
  ref_graphdef, ref_params, reward_graphdef, reward_params = _models()
  ro = _rollout()
  logits = jax.jit(lambda p, ids, m: nnx.merge(ref_graphdef, p)(ids, attention_mask=m)[0])(
      ref_params, ro.sequences, ro.sequence_mask)
  per_token = jax.jit(
      lambda p, ids, m: nnx.merge(reward_graphdef, p).per_token(ids, attention_mask=m))(
          reward_params, ro.sequences, ro.sequence_mask)
  return np.asarray(logits, np.float64), np.asarray(per_token, np.float64)


def _kl_np(name: str, logp: np.ndarray, ref: np.ndarray) -> np.ndarray:
  d = logp - ref
  return {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) - 1.0 + d}[name]


def _reference_score(cfg: PPOConfig, ro: R.Rollout, raw: np.ndarray, kl_coef: float,
                     gain: float, bias: float) -> dict[str, np.ndarray]:
  """Loop transcription of `score` given the raw sequence scores."""
  ref_logits, _ = _full_forwards()
  ids = np.asarray(ro.completion_ids)
  mask = np.asarray(ro.completion_mask, np.float64)
  logp = np.asarray(ro.logprobs, np.float64)
  ref_logprobs = np.zeros((B, N))
  kl = np.zeros((B, N))
  for i in range(B):
    for t in range(N):
      if mask[i, t] == 0:
        continue
      z = ref_logits[i, P - 1 + t] / ro.temperature  # position P-1+t predicts completion token t
      ref_logprobs[i, t] = z[ids[i, t]] - z.max() - np.log(np.exp(z - z.max()).sum())
      kl[i, t] = _kl_np(cfg.kl.estimator, logp[i, t], ref_logprobs[i, t])
  eos = np.array([e is not None for e in EOS_AT])
  scores = gain * raw + bias - cfg.missing_eos_penalty * (~eos)
  if cfg.whiten_scores:
    scores = (scores - scores.mean()) / np.sqrt(scores.var(ddof=1) + 1e-8)
  last = np.array([N - 1 if e is None else e for e in EOS_AT])
  token_rewards = np.zeros((B, N))
  token_rewards[np.arange(B), last] = scores
  if cfg.kl.in_reward:
    token_rewards -= kl_coef * kl
  seq_kl = kl.sum(axis=1)
  metrics = {
      "reward_mean": scores.mean(), "reward_std": scores.std(), "raw_score_mean": raw.mean(),
      "kl": seq_kl.mean(), "kl_per_token": kl.sum() / mask.sum(), "kl_coef": kl_coef,
      "non_score_reward": -kl_coef * seq_kl.mean(), "response_length": mask.sum(axis=1).mean(),
      "eos_rate": eos.mean(),
  }
  return dict(ref_logprobs=ref_logprobs, kl=kl, scores=scores, token_rewards=token_rewards,
              metrics=metrics)


def _raw_reward_model_scores() -> np.ndarray:
  """The reward head read at the last real token: the EOS, or the last token when cut."""
  _, per_token = _full_forwards()
  last = np.array([N - 1 if e is None else e for e in EOS_AT])
  return per_token[np.arange(B), P + last]


def _jit_score(cfg: PPOConfig, reward_fn: S.RewardFn):
  return jax.jit(functools.partial(S.score, cfg, ref_graphdef=_models()[0], reward_fn=reward_fn))


@pytest.mark.parametrize("estimator,in_reward,temperature,penalty,whiten,norm,kl_coef", [
    ("k1", True, 0.7, 1.0, False, (2.0, -0.5), 0.1),
    ("k2", False, 1.0, 0.0, True, None, 0.2),
    ("k3", True, 1.3, 0.5, True, (0.5, 0.3), 0.05),
])
def test_score_with_reward_model_matches_numpy(estimator, in_reward, temperature, penalty, whiten,
                                               norm, kl_coef):
  _, ref_params, reward_graphdef, reward_params = _models()
  cfg = PPOConfig(kl=kl_lib.KLConfig(estimator=estimator, in_reward=in_reward),
                  missing_eos_penalty=penalty, whiten_scores=whiten)
  ro = _rollout(temperature)
  reward_norm = None if norm is None else S.RewardNorm(gain=jnp.float32(norm[0]),
                                                       bias=jnp.float32(norm[1]))
  scored, metrics = _jit_score(cfg, S.reward_model_fn(reward_graphdef))(
      ro, ref_params=ref_params, reward_params=reward_params, kl_coef=jnp.float32(kl_coef),
      reward_norm=reward_norm)
  raw = _raw_reward_model_scores()
  gain, bias = (1.0, 0.0) if norm is None else norm
  ref = _reference_score(cfg, ro, raw, kl_coef, gain, bias)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scored.raw_scores, raw, **tol)
  np.testing.assert_allclose(scored.ref_logprobs, ref["ref_logprobs"], **tol)
  np.testing.assert_allclose(scored.kl, ref["kl"], **tol)
  np.testing.assert_allclose(scored.scores, ref["scores"], **tol)
  np.testing.assert_allclose(scored.token_rewards, ref["token_rewards"], **tol)
  assert scored.values is None   # the critic's values are collect's to add
  for name, value in ref["metrics"].items():
    np.testing.assert_allclose(metrics[name], value, err_msg=name, **tol)
  for x in (scored.raw_scores, scored.scores, scored.kl, scored.token_rewards):
    assert x.dtype == jnp.float32


def test_reward_model_is_read_at_the_eos_of_the_completion():
  _, _, reward_graphdef, reward_params = _models()
  ro = _rollout()
  raw = jax.jit(S.reward_model_fn(reward_graphdef))(reward_params, ro)
  row, last = 0, EOS_AT[0]
  # The model run on the sequence truncated right after the EOS reads its last column.
  seq = ro.sequences[row:row + 1, :P + last + 1]
  seq_mask = ro.sequence_mask[row:row + 1, :P + last + 1]
  assert int(seq[0, -1]) == EOS
  direct = jax.jit(lambda p, ids, m: nnx.merge(reward_graphdef, p)(ids, attention_mask=m))(
      reward_params, seq, seq_mask)
  np.testing.assert_allclose(raw[row], direct[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(last_valid_index(ro.completion_mask),
                                [N - 1 if e is None else e for e in EOS_AT])
  np.testing.assert_array_equal(ro.finished, [e is not None for e in EOS_AT])


def _target_share(params, ro: R.Rollout) -> jax.Array:
  """Rule-based reward: share of completion tokens equal to TARGET."""
  del params  # A rule needs no weights.
  hits = (ro.completion_ids == TARGET) * ro.completion_mask
  return hits.sum(-1) / jnp.maximum(ro.completion_mask.sum(-1), 1.0)


def test_plain_reward_function_replaces_the_reward_model():
  _, ref_params, _, _ = _models()
  ro = _rollout(0.9)
  cfg = PPOConfig(missing_eos_penalty=0.25)
  scored, metrics = _jit_score(cfg, _target_share)(
      ro, ref_params=ref_params, reward_params=None, kl_coef=jnp.float32(0.1))
  mask = np.asarray(ro.completion_mask)
  share = ((np.asarray(ro.completion_ids) == TARGET) * mask).sum(1) / mask.sum(1)
  assert len(set(share)) > 2
  np.testing.assert_allclose(scored.raw_scores, share, rtol=1e-6)
  ref = _reference_score(cfg, ro, share, 0.1, 1.0, 0.0)
  np.testing.assert_allclose(scored.scores, ref["scores"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scored.token_rewards, ref["token_rewards"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["kl"], ref["metrics"]["kl"], rtol=1e-5, atol=1e-5)


def test_reward_norm_calibrate_gives_mean_zero_std_one():
  raw = jnp.asarray(np.random.default_rng(4).normal(3.0, 2.5, 64), jnp.float32)
  norm = S.RewardNorm.calibrate(raw)
  assert norm.gain.dtype == jnp.float32 and norm.bias.dtype == jnp.float32
  scores = np.asarray(norm.gain * raw + norm.bias, np.float64)
  np.testing.assert_allclose(scores.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(scores.std(), 1.0, rtol=1e-5)
  identity = S.RewardNorm.identity()
  np.testing.assert_array_equal(identity.gain * raw + identity.bias, raw)


@functools.lru_cache(maxsize=None)
def _jit_rollout(graphdef: nnx.GraphDef, cfg: R.SamplingConfig):
  return jax.jit(functools.partial(R.rollout, graphdef, cfg=cfg))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_vanishes_when_policy_is_the_reference(estimator):
  ref_graphdef, ref_params, _, _ = _models()
  temperature = 0.8
  sampling = R.SamplingConfig(max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD,
                              temperature=temperature, top_k=16)
  base = _rollout()
  ro = _jit_rollout(ref_graphdef, sampling)(
      ref_params, base.prompt_ids, base.prompt_mask, jax.random.key(0))
  cfg = PPOConfig(kl=kl_lib.KLConfig(estimator=estimator))
  scored, metrics = _jit_score(cfg, _target_share)(
      ro, ref_params=ref_params, reward_params=None, kl_coef=jnp.float32(0.1))
  # Sampling (KV cache) and scoring (full forward) agree on every log-prob at the same T.
  np.testing.assert_allclose(scored.ref_logprobs, ro.logprobs, atol=1e-5)
  assert np.max(np.abs(np.asarray(scored.kl))) < 1e-5
  assert abs(float(metrics["kl"])) < 1e-5



def test_completion_logprobs_in_chunks_match_one_piece():
  ro = _rollout(0.8)
  whole = models.CausalLM(LLAMA, rngs=nnx.Rngs(1))
  chunked = models.CausalLM(LLAMA.replace(logits_chunk_size=4), rngs=nnx.Rngs(1))   # N = 6

  def run(model):
    graphdef, params = nnx.split(model)

    def total(p):
      logp, ent = S.completion_logprobs(nnx.merge(graphdef, p), ro, with_entropy=True)
      return logp.sum() + 0.1 * ent.sum(), (logp, ent)
    return jax.jit(jax.value_and_grad(total, has_aux=True))(params)

  (_, (want_logp, want_ent)), want_grad = run(whole)
  (_, (got_logp, got_ent)), got_grad = run(chunked)
  np.testing.assert_allclose(got_logp, want_logp, atol=1e-5)
  np.testing.assert_allclose(got_ent, want_ent, atol=1e-5)
  assert np.all(np.asarray(got_logp)[np.asarray(ro.completion_mask) == 0] == 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grad, want_grad)
