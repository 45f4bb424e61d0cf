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

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import KVCache, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How completions are sampled: the one home of the sampling temperature.

  Attributes:
    max_new_tokens: Completion buffer length N.
    temperature: Logits are divided by it before sampling. A `Rollout` records the config it was
      sampled with, and `score` and `ppo_update` recompute log-probs under that same tempered
      distribution (N implementation details of RLHF, Huang et al. 2024), so the temperatures
      of sampling and training cannot diverge.
    top_k: Keep the k most likely tokens (0: off).
    top_p: Nucleus sampling (Holtzman et al. 2020): keep the smallest set with mass >= top_p.
    greedy: Take the argmax instead of sampling.
    eos_token_id: Ends a completion (kept in it, and masked in). None: the tokenizer's, filled in
      by `with_special_tokens`.
    pad_token_id: Fills the buffer after EOS; must differ from EOS, else padding reads as EOS.
      None: the tokenizer's.
    ignore_eos: Never stop at EOS: every completion has exactly max_new_tokens tokens (fixed
      work, as benchmarks want; vLLM's `ignore_eos`).
    gather_weights: All-gather the policy's weights over the fsdp mesh axis once per rollout,
      before the prefill (`sharding.gather_fsdp`), so that no decode step gathers them again:
      an fsdp-sharded sampler otherwise moves every weight at each of the N steps. Costs the
      weights / tensor-axis size per device: with a tensor axis, the decode is then
      tensor-parallel over it and data-parallel over the rest; on fsdp alone, the whole model.
  """
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  ignore_eos: bool = False
  gather_weights: bool = False

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.pad_token_id is not None and self.eos_token_id == self.pad_token_id:
      raise ValueError(f"pad_token_id must differ from eos_token_id (both {self.pad_token_id})")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def with_special_tokens(self, eos_token_id: int | None,
                          pad_token_id: int | None) -> "SamplingConfig":
    """This config with its unset EOS / padding ids taken from a tokenizer's."""
    return dataclasses.replace(
        self, eos_token_id=self.eos_token_id if self.eos_token_id is not None else eos_token_id,
        pad_token_id=self.pad_token_id if self.pad_token_id is not None else pad_token_id)

  def check_special_tokens(self) -> None:
    """Raises unless the ids `rollout` needs are set."""
    if self.pad_token_id is None:
      raise ValueError("SamplingConfig.pad_token_id is not set (see with_special_tokens)")
    if self.eos_token_id is None and not self.ignore_eos:
      raise ValueError("SamplingConfig.eos_token_id is not set: give one or set ignore_eos=True")


@flax.struct.dataclass
class Rollout:
  """Prompts and sampled completions with fixed shapes.

  Attributes:
    prompt_ids, prompt_mask: [B, P], left padded.
    completion_ids: [B, N], pad after the first EOS.
    completion_mask: [B, N] float32, 1 through the first EOS inclusive.
    logprobs: [B, N] float32 log-probs of the sampled tokens under softmax(logits / T), 0 on padding.
    sampling: The SamplingConfig the completions were drawn with (static): whoever recomputes
      their log-probs reads the temperature here.
  """
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_ids: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array
  sampling: SamplingConfig = flax.struct.field(pytree_node=False)

  @property
  def temperature(self) -> float:
    return self.sampling.temperature

  @property
  def sequences(self) -> jax.Array:
    return jnp.concatenate([self.prompt_ids, self.completion_ids], axis=1)

  @property
  def sequence_mask(self) -> jax.Array:
    return jnp.concatenate(
        [self.prompt_mask.astype(jnp.float32), self.completion_mask.astype(jnp.float32)], axis=1)

  @property
  def finished(self) -> jax.Array:
    """[B] bool: the completion contains EOS (rather than being cut at max_new_tokens)."""
    eos = self.sampling.eos_token_id
    if eos is None:
      return jnp.zeros(self.completion_ids.shape[:1], jnp.bool_)
    return jnp.any((self.completion_ids == eos) & (self.completion_mask > 0), axis=-1)


def keep_mask(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """The tokens a top-k / top-p (nucleus, Holtzman et al. 2020) filter keeps. logits: [B, V]."""
  keep = jnp.ones(logits.shape, jnp.bool_)
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    keep = logits >= kth
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token; a token is kept while that mass is < top_p, so the
    # token that crosses top_p is kept too.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)
    keep = keep & (logits >= threshold)
  return keep


# Entries per block of the two-level CDF: float32 running sums stay within one block's mass.
_CDF_BLOCK = 128


def _first_above(cum: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Per row, the first index i with cum[i] > target (an inverse CDF), never a zero weight.

  cum: [B, n] running sums of weights [B, n] >= 0; target: [B]. A zero weight leaves the running
  sum unchanged, so it is never the first to exceed; when rounding puts target at or past the
  total, the last positive weight is taken.
  """
  n = cum.shape[-1]
  idx = jnp.sum(cum <= target[:, None], axis=-1)
  last_positive = n - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
  return jnp.minimum(idx, last_positive).astype(jnp.int32)


def categorical(rng: jax.Array, weights: jax.Array) -> jax.Array:
  """Draws index i of each row with probability weights[i] / sum(weights), by inverse CDF.

  weights: [B, V] >= 0 (unnormalised probabilities), at least one positive per row. One uniform u
  per row picks the i with W[i-1] <= u * W[V-1] < W[i], W the running sum. `jax.random.categorical`
  (Gumbel-max) draws V random numbers per row instead, and in decode those cost as much as a small
  model's whole step. The running sum is two-level (over blocks of `_CDF_BLOCK`, then inside the
  chosen block), so float32 rounding is that of a block's sum, not of the whole vocabulary's.
  """
  chex.assert_rank(weights, 2)
  b, v = weights.shape
  nb = -(-v // _CDF_BLOCK)
  blocks = jnp.pad(weights, ((0, 0), (0, nb * _CDF_BLOCK - v))).reshape(b, nb, _CDF_BLOCK)
  block_mass = blocks.sum(-1)
  block_cum = jnp.cumsum(block_mass, axis=-1)
  target = jax.random.uniform(rng, (b,), jnp.float32) * block_cum[:, -1]
  j = _first_above(block_cum, target, block_mass)
  inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]
  before = jnp.take_along_axis(block_cum - block_mass, j[:, None], axis=1)[:, 0]
  i = _first_above(jnp.cumsum(inner, axis=-1), target - before, inner)
  return j * _CDF_BLOCK + i


def sample_token(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig):
  """One token per row from logits [B, V]: (tokens [B], log softmax(logits / T)[token] [B]).

  The log-prob is that of the tempered distribution before top-k / top-p truncation, which is
  what `score` recomputes from the policy.
  """
  chex.assert_rank(logits, 2)
  scaled = logits.astype(jnp.float32) / cfg.temperature
  top = jnp.max(scaled, axis=-1, keepdims=True)
  weights = jnp.exp(scaled - top)
  if cfg.greedy:
    tok = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
  elif cfg.top_k > 0 or cfg.top_p < 1.0:
    tok = categorical(rng, jnp.where(keep_mask(scaled, cfg.top_k, cfg.top_p), weights, 0.0))
  else:
    tok = categorical(rng, weights)
  picked = jnp.take_along_axis(scaled, tok[:, None], axis=1)[:, 0]
  return tok, picked - top[:, 0] - jnp.log(weights.sum(-1))


@flax.struct.dataclass
class DecodeState:
  """The decode loop's carry.

  Attributes:
    t: int32 scalar, index of the next completion token to sample.
    last: [B] int32, the token sampled last (fed to the next step).
    live: [B] bool, `last` is a real token (its row had not finished before it).
    tokens, logprobs, valid: [B, N] completion buffers (pad / 0 / False where not sampled).
    done: [B] bool, the row has emitted EOS.
    cache: the policy's KVCache.
  """
  t: jax.Array
  last: jax.Array
  live: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  valid: jax.Array
  done: jax.Array
  cache: KVCache


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
  cfg.check_special_tokens()
  if cfg.gather_weights:
    params = sharding_lib.gather_fsdp(params)
  model = nnx.merge(graphdef, params)
  b, p = prompt_ids.shape
  n = cfg.max_new_tokens
  # The last sampled token is never fed back, so the cache holds p + n - 1 positions.
  cache = init_cache(model.cfg, b, p + n - 1)
  logits, cache = model(prompt_ids, attention_mask=prompt_mask, cache=cache, logits_to_keep=1)

  def emit(s: DecodeState, logits: jax.Array) -> DecodeState:
    """Samples token s.t from logits [B, V] into the buffers; rows already done get padding."""
    tok, lp = sample_token(jax.random.fold_in(rng, s.t), logits, cfg)
    live = jnp.logical_not(s.done)
    tok = jnp.where(live, tok, cfg.pad_token_id)
    done = s.done if cfg.ignore_eos else jnp.logical_or(s.done, tok == cfg.eos_token_id)

    def put(buf, col):
      return jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], s.t, axis=1)
    return s.replace(t=s.t + 1, last=tok, live=live, tokens=put(s.tokens, tok),
                     logprobs=put(s.logprobs, jnp.where(live, lp, 0.0)),
                     valid=put(s.valid, live), done=done)

  def cond(s: DecodeState):
    return jnp.logical_and(s.t < n, jnp.logical_not(jnp.all(s.done)))

  def body(s: DecodeState) -> DecodeState:
    # The model step comes first so that no step runs after the last token is sampled.
    # Rows that were already done feed padding that no later token may attend to.
    step_logits, cache = nnx.merge(graphdef, params)(
        s.last[:, None], attention_mask=s.live[:, None], cache=s.cache)
    return emit(s.replace(cache=cache), step_logits[:, 0])

  start = DecodeState(
      t=jnp.zeros((), jnp.int32), last=jnp.zeros((b,), jnp.int32),
      live=jnp.zeros((b,), jnp.bool_), tokens=jnp.full((b, n), cfg.pad_token_id, jnp.int32),
      logprobs=jnp.zeros((b, n), jnp.float32), valid=jnp.zeros((b, n), jnp.bool_),
      done=jnp.zeros((b,), jnp.bool_), cache=cache)
  out = jax.lax.while_loop(cond, body, emit(start, logits[:, 0]))
  return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=out.tokens,
                 completion_mask=out.valid.astype(jnp.float32), logprobs=out.logprobs,
                 sampling=cfg)


def completion_hidden(model, rollout: Rollout) -> jax.Array:
  """Final hidden states [B, N, d] of `model` at the positions that predict each completion token.

  Position P-1+t (the last prompt token, then each completion token) predicts completion token t.
  """
  p, n = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
  hidden, _ = model.decoder(rollout.sequences, attention_mask=rollout.sequence_mask,
                            keep=(p - 1, p + n - 1))
  return hidden
