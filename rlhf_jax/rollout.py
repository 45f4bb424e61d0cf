"""`rollout`: the policy generates completions for a batch of left-padded prompts.

Pure and jittable: one prefill over the prompts fills a fixed-size KV cache, then a
`lax.while_loop` decodes one token per step over fixed buffers with a per-row done mask and stops
as soon as every row has emitted EOS (or after `max_new_tokens`). Shapes never depend on the data.
"""

import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How completions are sampled.

  Attributes:
    max_new_tokens: Completion buffer length N.
    eos_token_id: Ends a completion (kept in it, and masked in). None: no stop token, every
      completion has exactly max_new_tokens tokens (fixed work, as benchmarks want).
    pad_token_id: Fills the buffer after EOS; must differ from EOS, else padding reads as EOS.
    temperature: Logits are divided by it before sampling; the returned log-probs use the same
      tempered distribution, which `score` and `ppo_update` must also use (N implementation
      details of RLHF, Huang et al. 2024).
    top_k: Keep the k most likely tokens (0: off).
    top_p: Nucleus sampling (Holtzman et al. 2020): keep the smallest set with mass >= top_p.
    greedy: Take the argmax instead of sampling.
  """
  max_new_tokens: int
  eos_token_id: int | None
  pad_token_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if self.eos_token_id == self.pad_token_id:
      raise ValueError(f"pad_token_id must differ from eos_token_id (both {self.pad_token_id})")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@flax.struct.dataclass
class Rollout:
  """Prompts and sampled completions with fixed shapes.

  Attributes:
    prompt_ids, prompt_mask: [B, P], left padded.
    completion_ids: [B, N], pad after the first EOS.
    completion_mask: [B, N] float32, 1 through the first EOS inclusive.
    logprobs: [B, N] float32 log-probs of the sampled tokens under softmax(logits / T), 0 on padding.
  """
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_ids: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array

  @property
  def sequences(self) -> jax.Array:
    return jnp.concatenate([self.prompt_ids, self.completion_ids], axis=1)

  @property
  def sequence_mask(self) -> jax.Array:
    return jnp.concatenate(
        [self.prompt_mask.astype(jnp.float32), self.completion_mask.astype(jnp.float32)], axis=1)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. logits: [B, V]."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token; a token is kept while that mass is < top_p, so the
    # token that crosses top_p is kept too.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def sample_token(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig):
  """One token per row from logits [B, V]: (tokens [B], log softmax(logits / T)[token] [B])."""
  chex.assert_rank(logits, 2)
  scaled = logits.astype(jnp.float32) / cfg.temperature
  logp = jax.nn.log_softmax(scaled, axis=-1)
  if cfg.greedy:
    tok = jnp.argmax(scaled, axis=-1)
  else:
    tok = jax.random.categorical(rng, filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
  return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]


def rollout(graphdef: nnx.GraphDef, params: nnx.State, prompt_ids: jax.Array,
            prompt_mask: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> Rollout:
  """Samples completions for left-padded prompts (prefill + `lax.while_loop` decode).

  Args:
    graphdef, params: the policy (`nnx.split` of a CausalLM).
    prompt_ids, prompt_mask: [B, P], left padded (the last column is every row's last prompt token).
    rng: PRNG key.
    cfg: SamplingConfig (static).

  Returns:
    Rollout with completions of fixed length cfg.max_new_tokens.
  """
  chex.assert_rank([prompt_ids, prompt_mask], 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  model = nnx.merge(graphdef, params)
  b, p = prompt_ids.shape
  n = cfg.max_new_tokens
  cache = init_cache(model.cfg, b, p + n)
  logits, cache = model(prompt_ids, attention_mask=prompt_mask, cache=cache)

  def cond(carry):
    t, _, _, _, done, _, _ = carry
    return jnp.logical_and(t < n, jnp.logical_not(jnp.all(done)))

  def body(carry):
    t, tokens, logprobs, valid, done, last_logits, cache = carry
    tok, lp = sample_token(jax.random.fold_in(rng, t), last_logits, cfg)
    live = jnp.logical_not(done)
    tok = jnp.where(live, tok, cfg.pad_token_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(
        logprobs, jnp.where(live, lp, 0.0)[:, None], t, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(valid, live[:, None], t, axis=1)
    if cfg.eos_token_id is not None:
      done = jnp.logical_or(done, tok == cfg.eos_token_id)
    # Rows already done feed padding that no later token may attend to.
    step_logits, cache = nnx.merge(graphdef, params)(
        tok[:, None], attention_mask=live[:, None], cache=cache)
    return t + 1, tokens, logprobs, valid, done, step_logits[:, 0], cache

  init = (jnp.zeros((), jnp.int32), jnp.full((b, n), cfg.pad_token_id, jnp.int32),
          jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.bool_),
          jnp.zeros((b,), jnp.bool_), logits[:, -1], cache)
  _, tokens, logprobs, valid, _, _, _ = jax.lax.while_loop(cond, body, init)
  return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=tokens,
                 completion_mask=valid.astype(jnp.float32), logprobs=logprobs)
