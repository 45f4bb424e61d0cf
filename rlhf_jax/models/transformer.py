"""Decoder-only transformers (GPT-2, Llama 2/3, Qwen2, Qwen3) as Flax NNX modules.

One implementation, switched by `DecoderConfig`. Every parameter carries logical axis names in its
`axes` metadata (MaxText style) so `rlhf_jax.sharding` can place it on any mesh. Hot code uses these
modules functionally: `graphdef, params = nnx.split(model)` and `nnx.merge(graphdef, params)` inside
jitted pure functions.

Attention is written once for both the plain forward and the KV-cached path: queries occupy slots
`index .. index+T` of a key buffer and may attend slot j iff j <= their slot and slot j holds a real
token. Without a cache the buffer is the sequence itself. Left padding therefore needs no special
case: padded slots are masked out and position ids come from the mask (cumsum(mask) - 1).
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import DecoderConfig

_NEG_INF = float(np.finfo(np.float32).min)
# Up to this many rows, the tied LM head is computed vocabulary-major (see `CausalLM.logits`).
_VOCAB_MAJOR_MAX_ROWS = 128


def _normal(std):
  return jax.nn.initializers.normal(std)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


def _along(v: jax.Array, axis: int, ndim: int) -> jax.Array:
  """A vector v [n] shaped to broadcast along `axis` of an ndim-rank array."""
  shape = [1] * ndim
  shape[axis] = -1
  return v.reshape(shape)


def _dense(x: jax.Array, w: jax.Array, bias: jax.Array | None, feature_major: bool) -> jax.Array:
  """A linear layer: token-major x [..., in] @ w [in, out], or feature-major w [out, in] @ x [in, B].

  Feature-major w is the transposed copy made once before a decode loop (see
  `Decoder.feature_major_weights`). On 2 CPU cores XLA runs a matmul with 16-64 rows 1.5-2.5x
  slower as x @ w than as w^T @ x^T with w^T stored (GPT-2 124M's MLP on 16 rows: 3.0 against 1.5
  ms), and a decode step is made of such matmuls.
  """
  y = w @ x if feature_major else x @ w.astype(x.dtype)
  if bias is None:
    return y
  return y + _along(bias.astype(x.dtype), 0 if feature_major else -1, y.ndim)


@jax.custom_vjp
def _grad_fusion_boundary(x: jax.Array) -> jax.Array:
  """Identity; under differentiation its cotangent is computed once, into a buffer of its own.

  A block's output gradient is a sum over the contributions of every later block. XLA:CPU fuses
  that sum into each op that reads it (among them the transposes feeding the weight-gradient
  dots) instead of writing it once, so with L blocks it recomputes O(L^2) terms: up to 46-operand
  fusions in GPT-2 124M's backward. An `optimization_barrier` does not stop this (XLA:CPU expands
  it before fusion); a conditional is a fusion boundary XLA keeps. Its predicate is true unless
  the gradient's first element is NaN, and both branches return the gradient's values.
  """
  return x


def _grad_fusion_boundary_fwd(x):
  return x, None


def _grad_fusion_boundary_bwd(_, g):
  first = g.reshape(-1)[0]
  # The branches differ, or XLA would fold the conditional away: g + 0 g is g for finite g.
  return (jax.lax.cond(first == first, lambda g: g, lambda g: g + 0.0 * g, g),)


_grad_fusion_boundary.defvjp(_grad_fusion_boundary_fwd, _grad_fusion_boundary_bwd)


@flax.struct.dataclass
class KVCache:
  """Fixed-size decode cache.

  Attributes:
    k, v: Per-layer tuples of [B, num_kv_heads, S, head_dim] buffers: head-major, so a decode
      step's attention is a plain batched matmul over each head's contiguous [S, head_dim] block.
    mask: [B, S] bool, slot holds a real (attendable) token.
    pos: [B] int32, position id the next real token of each row will get.
    index: int32 scalar, next slot to write (shared by the batch: fixed shapes).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  pos: jax.Array
  index: jax.Array


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots for `batch` rows."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return KVCache(
      k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
      v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
      mask=jnp.zeros((batch, max_len), jnp.bool_),
      pos=jnp.zeros((batch,), jnp.int32),
      index=jnp.zeros((), jnp.int32))


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids of a left-padded batch: cumsum(mask) - 1, clipped at 0 on the padding."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """RoPE inverse frequencies theta^(-2i/d) (Su et al. 2021), with Hugging Face's scalings.

  "linear": divide by `factor` (Chen et al. 2023). "llama3": the Llama 3.1 band-wise rule, long
  wavelengths divided by `factor`, short ones kept, a smooth blend between
  (transformers `_compute_llama3_parameters`).
  """
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  scaling = dict(cfg.rope_scaling)
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates [B, H, T, D] by angle position * inv_freq, rotate-half layout (Hugging Face)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, None]
  sin = jnp.sin(angles)[:, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Norm(nnx.Module):
  """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), statistics in float32."""

  def __init__(self, cfg: DecoderConfig, dim: int, axes: tuple, *, rngs: nnx.Rngs):
    del rngs
    self.kind = cfg.norm
    self.eps = cfg.norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), cfg.weight_dtype), axes=axes)
    if cfg.norm == "layernorm":
      self.bias = nnx.Param(jnp.zeros((dim,), cfg.weight_dtype), axes=axes)

  def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
    """Normalises x over its feature axis `axis` (0 for feature-major activations [d, B])."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    scale = _along(self.scale[...].astype(jnp.float32), axis, x.ndim)
    if self.kind == "layernorm":
      x = x - x.mean(axis, keepdims=True)
      y = x * jax.lax.rsqrt((x * x).mean(axis, keepdims=True) + self.eps)
      return (y * scale + _along(self.bias[...], axis, x.ndim)).astype(dtype)
    y = x * jax.lax.rsqrt((x * x).mean(axis, keepdims=True) + self.eps)
    return (scale * y).astype(dtype)


class Attention(nnx.Module):
  """Multi-head / grouped-query causal self-attention (Vaswani et al. 2017; Ainslie et al. 2023)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd, wd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
    init = _normal(0.02)
    self.q = _param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), wd)
    self.k = _param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.v = _param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.o = _param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), wd)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((h, hd), wd), axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((kv, hd), wd), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((kv, hd), wd), axes=("kv_heads", "head_dim"))
    if cfg.out_bias:
      self.o_bias = nnx.Param(jnp.zeros((d,), wd), axes=("embed",))
    if cfg.qk_norm:
      self.q_norm = Norm(cfg, hd, ("head_dim",), rngs=rngs)
      self.k_norm = Norm(cfg, hd, ("head_dim",), rngs=rngs)

  def _proj(self, x, name, wt):
    """x -> heads [B,H,T,D]: token-major x [B,T,d], or feature-major x [d,B] (T = 1) with wt.

    Token-major is a matmul against the [d, H*D] view of the weight, then a transpose to
    head-major: XLA:CPU computed the direct head-major einsum transposed, with copies of its input
    (in the tiny benchmark's prefill, 4-6 ms per projection against 3 ms).
    """
    w = getattr(self, name)[...]
    heads, hd = w.shape[1:]
    bias = getattr(self, f"{name}_bias")[...].reshape(heads * hd) if self.cfg.qkv_bias else None
    if wt is not None:
      return _dense(x, wt[name], bias, feature_major=True).T.reshape(-1, heads, 1, hd)
    b, t, _ = x.shape
    y = _dense(x, w.reshape(w.shape[0], heads * hd), bias, feature_major=False)
    return y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)

  def feature_major_weights(self, dtype) -> dict[str, jax.Array]:
    """The projections as [out, in] matrices, for a feature-major decode step."""
    d = self.cfg.hidden_size
    w = {n: getattr(self, n)[...].reshape(d, -1).T.astype(dtype) for n in ("q", "k", "v")}
    w["o"] = self.o[...].reshape(-1, d).T.astype(dtype)
    return w

  def __call__(self, x, positions, key_mask, layer_cache, index, wt=None, keep=None):
    """x [B,T,d]; key_mask [B,S]; layer_cache (k, v) buffers [B,KV,S,D] or None (then S == T).

    With wt (`feature_major_weights`), a one-token decode step on feature-major x [d, B], which
    returns [d, B]. With keep = (start, stop), only the queries of positions start..stop-1 are
    computed (keys and values still cover all T), and the output is [B, stop - start, d].
    """
    cfg = self.cfg
    start, x_q, q_positions = 0, x, positions
    if keep is not None:
      start, stop = keep
      x_q, q_positions = x[:, start:stop], positions[:, start:stop]
    q = self._proj(x_q, "q", wt)
    k, v = self._proj(x, "k", wt), self._proj(x, "v", wt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      inv_freq = rope_inv_freq(cfg)  # a trace-time constant
      q = apply_rope(q, q_positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    if layer_cache is not None:
      ck, cv = layer_cache
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=2)
      new_cache = (k, v)
    else:
      new_cache = None
    b, h, t, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    # Group query heads onto their shared kv head instead of repeating k/v (no copies for GQA).
    q = q.reshape(b, kvh, h // kvh, t, hd)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(hd)
    q_slot = index + start + jnp.arange(t)
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).reshape(b, h, t, hd).astype(x.dtype)
    bias = self.o_bias[...] if cfg.out_bias else None
    if wt is not None:
      return _dense(out.reshape(b, h * hd).T, wt["o"], bias, feature_major=True), new_cache
    y = jnp.einsum("bhtk,hkd->btd", out, self.o[...].astype(x.dtype))
    return (y if bias is None else y + bias.astype(x.dtype)), new_cache


class MLP(nnx.Module):
  """GPT-2 fc/proj MLP, or the gated SwiGLU MLP of Llama/Qwen (Shazeer 2020)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, wd = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
    init = _normal(0.02)
    self.up = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
    self.down = _param(rngs, init, (f, d), ("mlp", "embed"), wd)
    if cfg.gated_mlp:
      self.gate = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
    if cfg.mlp_bias:
      self.up_bias = nnx.Param(jnp.zeros((f,), wd), axes=("mlp",))
      self.down_bias = nnx.Param(jnp.zeros((d,), wd), axes=("embed",))
      if cfg.gated_mlp:
        self.gate_bias = nnx.Param(jnp.zeros((f,), wd), axes=("mlp",))

  def _dense(self, x, name, wt):
    bias = getattr(self, f"{name}_bias")[...] if self.cfg.mlp_bias else None
    if wt is None:
      return _dense(x, getattr(self, name)[...], bias, feature_major=False)
    return _dense(x, wt[name], bias, feature_major=True)

  def feature_major_weights(self, dtype) -> dict[str, jax.Array]:
    """The matrices as [out, in], for a feature-major decode step."""
    names = ("gate", "up", "down") if self.cfg.gated_mlp else ("up", "down")
    return {n: getattr(self, n)[...].T.astype(dtype) for n in names}

  def __call__(self, x, wt=None):
    """x [..., d] -> [..., d]; with wt (`feature_major_weights`), x [d, B] -> [d, B]."""
    act = {"silu": jax.nn.silu, "gelu": lambda z: jax.nn.gelu(z, approximate=False),
           "gelu_new": lambda z: jax.nn.gelu(z, approximate=True)}[self.cfg.activation]
    if self.cfg.gated_mlp:
      hidden = act(self._dense(x, "gate", wt)) * self._dense(x, "up", wt)
    else:
      hidden = act(self._dense(x, "up", wt))
    return self._dense(hidden, "down", wt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def feature_major_weights(self, dtype) -> dict[str, dict[str, jax.Array]]:
    return {"attn": self.attn.feature_major_weights(dtype),
            "mlp": self.mlp.feature_major_weights(dtype)}

  def __call__(self, x, positions, key_mask, layer_cache, index, wt=None, keep=None):
    """Token-major x [B,T,d], or with wt (`feature_major_weights`) a decode step on x [d,B].

    keep = (start, stop): the block's output only at those positions (see `Decoder.__call__`).
    """
    axis = -1 if wt is None else 0
    y, layer_cache = self.attn(self.attn_norm(x, axis), positions, key_mask, layer_cache, index,
                               None if wt is None else wt["attn"], keep)
    if keep is not None:
      x = x[:, keep[0]:keep[1]]
    x = x + y
    return x + self.mlp(self.mlp_norm(x, axis), None if wt is None else wt["mlp"]), layer_cache


class Decoder(nnx.Module):
  """Embeddings, blocks and final norm: token ids -> hidden states [B, T, d]."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, _normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                        ("vocab", "embed"), cfg.weight_dtype)
    if cfg.positions == "learned":
      self.pos_embed = _param(rngs, _normal(0.01), (cfg.max_position_embeddings, cfg.hidden_size),
                              (None, "embed"), cfg.weight_dtype)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)

  def feature_major_weights(self) -> tuple[dict, ...]:
    """Per block, transposed ([out, in]) copies of its matrices, for feature-major decode steps.

    Made once before a decode loop (XLA does not hoist a transpose out of a while loop): they
    take as much memory as the blocks' weights, so this is a layout for CPUs, where it makes
    the 16-64-row matmuls of a decode step fast, not for accelerators.
    """
    return tuple(block.feature_major_weights(self.cfg.compute_dtype) for block in self.layers)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
               feature_major_weights=None, keep: tuple[int, int] | None = None):
    """Returns (hidden [B,T,d], cache or None).

    Args:
      input_ids: [B, T] int.
      attention_mask: [B, T], 1 on real tokens (left padding allowed); all ones if None.
      positions: [B, T] position ids; derived from the mask (and the cache's `pos`) if None.
      cache: a KVCache to append these T tokens to, or None for a plain forward.
      feature_major_weights: from `feature_major_weights()`, for a one-token step with a cache:
        the blocks then run on feature-major activations [d, B] (same result, other layout).
      keep: (start, stop): only the hidden states of positions start..stop-1 are wanted
        ([B, stop - start, d]). The last block then computes its queries, attention and MLP for
        those rows only; its keys and values (and the cache) still cover every position. A loss
        on the completion, a critic or a prefill reads no other rows.
    """
    cfg = self.cfg
    b, t = input_ids.shape
    fm = feature_major_weights
    if fm is not None and (t != 1 or cache is None or keep is not None):
      raise ValueError(f"feature-major weights are for one-token decode steps with a cache and "
                       f"no keep, got {t} tokens{'' if cache is not None else ', no cache'}"
                       f"{'' if keep is None else ', keep=' + str(keep)}")
    if keep is not None and not 0 <= keep[0] < keep[1] <= t:
      raise ValueError(f"keep={keep} is not a non-empty range of the {t} positions")
    mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(mask)
      if cache is not None:
        positions = positions + cache.pos[:, None]
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.compute_dtype)
    if cfg.positions == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.compute_dtype)
    if cache is None:
      index, key_mask = jnp.zeros((), jnp.int32), mask
    else:
      index = cache.index
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, index, axis=1)
    if fm is not None:
      x = x[:, 0].T
    new_k, new_v = [], []
    # Only for XLA:CPU's fusion (see `_grad_fusion_boundary`): elsewhere a conditional costs a
    # device-to-host copy of its predicate.
    grad_boundaries = cache is None and jax.default_backend() == "cpu"
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_cache = block(x, positions, key_mask, layer_cache, index,
                             None if fm is None else fm[i],
                             keep if i == len(self.layers) - 1 else None)
      if grad_boundaries:
        x = _grad_fusion_boundary(x)
      if cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    if fm is not None:
      x = self.final_norm(x, axis=0).T[:, None]
    else:
      x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, KVCache(k=tuple(new_k), v=tuple(new_v), mask=key_mask,
                      pos=cache.pos + mask.sum(-1).astype(jnp.int32), index=index + t)


class CausalLM(nnx.Module):
  """Decoder with a language-model head; `model(ids, attention_mask=m)` gives float32 logits."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, _normal(0.02), (cfg.hidden_size, cfg.vocab_size),
                            ("embed", "vocab"), cfg.weight_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., d] -> float32 logits [..., V]."""
    if self.cfg.tie_word_embeddings:
      w = self.decoder.embed[...].astype(hidden.dtype)
      if hidden.size // hidden.shape[-1] <= _VOCAB_MAJOR_MAX_ROWS:
        # Few rows (a decode step): the [V, d] table as the matmul's left operand, in its stored
        # layout, then a transpose of the small [V, rows] result. XLA:CPU is slow on a matmul
        # with only 16-64 rows on the left (2 cores: GPT-2 124M's head on 16 rows, 20 ms
        # against 12 ms plus the transpose; the tiny benchmark's on 64 rows, 3.6 against 2.9 ms).
        out = jnp.moveaxis(jnp.einsum("vd,...d->v...", w, hidden), 0, -1)
      else:
        out = jnp.einsum("...d,vd->...v", hidden, w)
    else:
      out = hidden @ self.lm_head[...].astype(hidden.dtype)
    return out.astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
               logits_to_keep: int = 0, feature_major_weights=None):
    """Logits [B,T,V]; with a cache, (logits, new_cache).

    logits_to_keep: k > 0 keeps only the last k positions' logits ([B,k,V]), as in transformers; a
      prefill needs just the last one, and the LM head is the largest matmul of a small model.
    feature_major_weights: see `Decoder.__call__`.
    """
    t = input_ids.shape[1]
    hidden, new_cache = self.decoder(input_ids, attention_mask, positions, cache,
                                     feature_major_weights,
                                     (max(t - logits_to_keep, 0), t) if logits_to_keep else None)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)


class ScalarModel(nnx.Module):
  """Decoder with a linear scalar head: reward models and critics.

  `model(ids, attention_mask=m)` reads the head at the last real token of each row, like Hugging Face
  `*ForSequenceClassification` (shape [B] for one label, [B, num_labels] otherwise);
  `model.per_token(...)` gives the head at every position ([B, T]), which a critic needs.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, head_std: float = 0.0):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    # Zero init by default: a fresh value head predicts 0 instead of noise (N implementation details).
    init = _normal(head_std) if head_std > 0 else jax.nn.initializers.zeros
    self.head = _param(rngs, init, (cfg.hidden_size, cfg.num_labels), ("embed", None),
                       cfg.weight_dtype)

  def apply_head(self, hidden: jax.Array) -> jax.Array:
    """The scalar head on hidden states [..., d] -> float32 [...] (or [..., num_labels])."""
    out = (hidden @ self.head[...].astype(hidden.dtype)).astype(jnp.float32)
    return out[..., 0] if self.cfg.num_labels == 1 else out

  def per_token(self, input_ids, attention_mask=None, positions=None):
    hidden, _ = self.decoder(input_ids, attention_mask, positions)
    return self.apply_head(hidden)

  def __call__(self, input_ids, attention_mask=None, positions=None, read_index=None):
    """Scores read at `read_index` [B] (default: the last real token of each row)."""
    hidden, _ = self.decoder(input_ids, attention_mask, positions)
    if read_index is None:
      t = input_ids.shape[1]
      if attention_mask is None:
        read_index = jnp.full((input_ids.shape[0],), t - 1)
      else:
        read_index = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=-1)
    picked = jnp.take_along_axis(hidden, read_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return self.apply_head(picked)
