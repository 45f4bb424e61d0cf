"""Decoder-only transformers (GPT-2, Llama 2/3, Qwen2, Qwen3) as Flax NNX modules.

One implementation, switched by `DecoderConfig`. Every parameter carries logical axis names in its
`axes` metadata (MaxText style) so `rlhf_jax.sharding` can place it on any mesh. Hot code uses these
modules functionally: `graphdef, params = nnx.split(model)` and `nnx.merge(graphdef, params)` inside
jitted pure functions.

The blocks are one `Block` whose parameters carry a leading "layers" axis, applied by one
`jax.lax.scan` (MaxText's `scan_layers`): the program holds one block whatever the depth, so
compile time stays flat in it, and `DecoderConfig.remat` picks what each block keeps for the
backward pass. The KV cache is stacked the same way ([L, B, KV, S, D]) and carried through the scan.

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
from rlhf_jax.sharding import constrain

_NEG_INF = float(np.finfo(np.float32).min)
# Logical axes of the activations (see `rlhf_jax.sharding.constrain`).
_EMBED = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_heads", "activation_length", "activation_head_dim")
_KV_HEADS = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")
_MLP = ("activation_batch", "activation_length", "activation_mlp")


def _normal(std):
  return jax.nn.initializers.normal(std)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


def _dense(x: jax.Array, w: jax.Array, bias: jax.Array | None) -> jax.Array:
  """A linear layer x [..., in] @ w [in, out] (+ bias [out])."""
  y = x @ w.astype(x.dtype)
  return y if bias is None else y + bias.astype(x.dtype)


def _adapted(module, name: str, x, y, contract: str = "...i,ir->...r"):
  """y plus the LoRA adapter `<name>_lora` of `module` applied to x, if it has one
  (`rlhf_jax.models.lora`)."""
  adapter = getattr(module, f"{name}_lora", None)
  return y if adapter is None else y + adapter(x, contract).astype(y.dtype)


def _weight(module, name: str) -> nnx.Param:
  """The weight `name` of `module`, or the trained copy `<name>_saved` that LoRA's
  `modules_to_save` put beside it (`rlhf_jax.models.lora`)."""
  saved = getattr(module, f"{name}_saved", None)
  return getattr(module, name) if saved is None else saved


@flax.struct.dataclass
class KVCache:
  """Fixed-size decode cache.

  Attributes:
    k, v: [L, B, num_kv_heads, S, head_dim] buffers, one slab per layer: head-major, so a decode
      step's attention is a plain batched matmul over each head's contiguous [S, head_dim] block.
    mask: [B, S] bool, slot holds a real (attendable) token.
    pos: [B] int32, position id the next real token of each row will get.
    index: int32 scalar, next slot to write (shared by the batch: fixed shapes).
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  pos: jax.Array
  index: jax.Array


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots for `batch` rows."""
  dtype = dtype or cfg.compute_dtype
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
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

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x over its last axis."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    scale = self.scale[...].astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - x.mean(-1, keepdims=True)
      y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
      return (y * scale + self.bias[...]).astype(dtype)
    y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
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

  def _proj(self, x, name, axes):
    """x [B,T,d] -> heads [B,H,T,D] (logical `axes`).

    A matmul against the [d, H*D] view of the weight, then a transpose to head-major: XLA:CPU
    computed the direct head-major einsum transposed, with copies of its input.
    """
    w = getattr(self, name)[...]
    heads, hd = w.shape[1:]
    bias = getattr(self, f"{name}_bias")[...].reshape(heads * hd) if self.cfg.qkv_bias else None
    b, t, _ = x.shape
    y = _adapted(self, name, x, _dense(x, w.reshape(w.shape[0], heads * hd), bias))
    return constrain(y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3), axes)

  def __call__(self, x, positions, key_mask, index, kv=None, layer=None):
    """x [B,T,d] -> ([B,T,d], kv); key_mask [B,S].

    kv: None (then S == T: the keys are these tokens), or the stacked cache buffers (k, v)
    [L, B, KV, S, D], into which this `layer`'s keys and values for the T tokens are written at
    slot `index` before attending over the layer's whole slab.
    """
    cfg = self.cfg
    q = self._proj(x, "q", _HEADS)
    k, v = self._proj(x, "k", _KV_HEADS), self._proj(x, "v", _KV_HEADS)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      inv_freq = rope_inv_freq(cfg)  # a trace-time constant
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    if kv is not None:
      zero = jnp.zeros((), jnp.int32)
      at = (layer, zero, zero, index, zero)
      kv = tuple(jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), at)
                 for buf, new in zip(kv, (k, v)))
      k, v = kv[0][layer], kv[1][layer]
    b, h, t, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    # Group query heads onto their shared kv head instead of repeating k/v (no copies for GQA).
    q = q.reshape(b, kvh, h // kvh, t, hd)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(hd)
    q_slot = index + jnp.arange(t)
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).reshape(b, h, t, hd).astype(x.dtype)
    out = constrain(out, _HEADS)
    y = _adapted(self, "o", out, jnp.einsum("bhtk,hkd->btd", out, self.o[...].astype(x.dtype)),
                 "bhtk,hkr->btr")
    return (y + self.o_bias[...].astype(x.dtype) if cfg.out_bias else y), kv


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

  def _dense(self, x, name):
    bias = getattr(self, f"{name}_bias")[...] if self.cfg.mlp_bias else None
    return _adapted(self, name, x, _dense(x, getattr(self, name)[...], bias))

  def __call__(self, x):
    """x [..., d] -> [..., d]."""
    act = {"silu": jax.nn.silu, "gelu": lambda z: jax.nn.gelu(z, approximate=False),
           "gelu_new": lambda z: jax.nn.gelu(z, approximate=True)}[self.cfg.activation]
    if self.cfg.gated_mlp:
      hidden = act(self._dense(x, "gate")) * self._dense(x, "up")
    else:
      hidden = act(self._dense(x, "up"))
    return self._dense(constrain(hidden, _MLP), "down")


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, key_mask, index, kv=None, layer=None):
    """x [B,T,d] -> ([B,T,d], kv); kv and layer as in `Attention.__call__`."""
    x = constrain(x, _EMBED)
    y, kv = self.attn(self.attn_norm(x), positions, key_mask, index, kv, layer)
    x = x + y
    return constrain(x + self.mlp(self.mlp_norm(x)), _EMBED), kv


def _stack(blocks: list[nnx.Module]) -> nnx.Module:
  """One module whose parameters are those of `blocks` stacked on a new leading "layers" axis."""
  graphdef = nnx.graphdef(blocks[0])
  states = [nnx.state(b) for b in blocks]
  stacked = jax.tree.map(
      lambda *vs: vs[0].replace(jnp.stack([v[...] for v in vs]), axes=("layers",) + vs[0].axes),
      *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


_REMAT_POLICIES = {
    "full": None,
    "save_all_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Decoder(nnx.Module):
  """Embeddings, blocks and final norm: token ids -> hidden states [B, T, d]."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, _normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                        ("vocab", "embed"), cfg.weight_dtype)
    if cfg.positions == "learned":
      self.pos_embed = _param(rngs, _normal(0.01), (cfg.max_position_embeddings, cfg.hidden_size),
                              (None, "embed"), cfg.weight_dtype)
    # Built one by one, then stacked: the same draws from `rngs` as separate blocks would get.
    self.layers = _stack([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)

  def _blocks(self, x, positions, key_mask, index, kv):
    """Every block in turn, one `lax.scan` over the stacked parameters: (x, kv)."""
    graphdef, stacked = nnx.split(self.layers)

    def block(carry, xs):
      x, kv = carry
      params, layer = xs
      return nnx.merge(graphdef, params)(x, positions, key_mask, index, kv, layer), None

    if kv is None and self.cfg.remat != "none":   # only a plain forward is ever differentiated
      block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
    layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    return jax.lax.scan(block, (x, kv), (stacked, layers))[0]

  def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
               keep: tuple[int, int] | None = None):
    """Returns (hidden [B,T,d], cache or None).

    Args:
      input_ids: [B, T] int.
      attention_mask: [B, T], 1 on real tokens (left padding allowed); all ones if None.
      positions: [B, T] position ids; derived from the mask (and the cache's `pos`) if None.
      cache: a KVCache to append these T tokens to, or None for a plain forward.
      keep: (start, stop): only the hidden states of positions start..stop-1 are wanted
        ([B, stop - start, d]); only those rows go through the final norm (and a head after it).
    """
    cfg = self.cfg
    b, t = input_ids.shape
    if keep is not None and not 0 <= keep[0] < keep[1] <= t:
      raise ValueError(f"keep={keep} is not a non-empty range of the {t} positions")
    mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(mask)
      if cache is not None:
        positions = positions + cache.pos[:, None]
    x = jnp.take(_weight(self, "embed")[...], input_ids, axis=0).astype(cfg.compute_dtype)
    if cfg.positions == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.compute_dtype)
    x = constrain(x, _EMBED)
    if cache is None:
      index, key_mask, kv = jnp.zeros((), jnp.int32), mask, None
    else:
      index, kv = cache.index, (cache.k, cache.v)
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, index, axis=1)
    x, kv = self._blocks(x, positions, key_mask, index, kv)
    if keep is not None:
      x = x[:, keep[0]:keep[1]]
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, KVCache(k=kv[0], v=kv[1], mask=key_mask,
                      pos=cache.pos + mask.sum(-1).astype(jnp.int32), index=index + t)


class CausalLM(nnx.Module):
  """Decoder with a language-model head; `model(ids, attention_mask=m)` gives (logits, cache)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, _normal(0.02), (cfg.hidden_size, cfg.vocab_size),
                            ("embed", "vocab"), cfg.weight_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., d] -> float32 logits [..., V]."""
    if self.cfg.tie_word_embeddings:
      embed = _weight(self.decoder, "embed")[...]
      out = jnp.einsum("...d,vd->...v", hidden, embed.astype(hidden.dtype))
    else:
      out = hidden @ _weight(self, "lm_head")[...].astype(hidden.dtype)
    rows = (None,) * (out.ndim - 2)   # [B, ..., V]
    return constrain(out, ("activation_batch", *rows, "activation_vocab")).astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
               logits_to_keep: int = 0):
    """(float32 logits [B,T,V], the cache extended by these tokens, or None without one).

    logits_to_keep: k > 0 keeps only the last k positions' logits ([B,k,V]), as in transformers; a
      prefill needs just the last one, and the LM head is the largest matmul of a small model.
    """
    t = input_ids.shape[1]
    keep = (max(t - logits_to_keep, 0), t) if logits_to_keep else None
    hidden, new_cache = self.decoder(input_ids, attention_mask, positions, cache, keep)
    return self.logits(hidden), new_cache


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
