"""The parts of one decoder block (`Block`): norms, attention with RoPE, the MLP.

Every parameter carries logical axis names in its `axes` metadata (MaxText style) so
`rlhf_jax.sharding` can place it on any mesh; `param` builds one, here and in `transformer`.

Attention is written once for both the plain forward and the KV-cached path: queries occupy slots
`index .. index+T` of a key buffer and may attend slot j iff j <= their slot and slot j holds a real
token. Without a cache the buffer is the sequence itself. Left padding therefore needs no special
case: padded slots are masked out and position ids come from the mask (cumsum(mask) - 1).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.sharding import constrain

_NEG_INF = float(np.finfo(np.float32).min)
# Logical axes of the activations (see `rlhf_jax.sharding.constrain`).
EMBED = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_heads", "activation_length", "activation_head_dim")
_KV_HEADS = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")
_MLP = ("activation_batch", "activation_length", "activation_mlp")


def normal(std):
  """The N(0, std^2) initializer of every weight matrix (GPT-2's 0.02 for most)."""
  return jax.nn.initializers.normal(std)


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  """A parameter drawn from `init` with its logical `axes` (`rlhf_jax.sharding`)."""
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
    init = normal(0.02)
    self.q = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), wd)
    self.k = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.v = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.o = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), wd)
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

  def __call__(self, x, positions, key_mask, index, kv=None, layer=None, rows=None):
    """x [B,T,d] -> ([B,T,d], kv); key_mask [B,S].

    kv: None (then S == T: the keys are these tokens), or the stacked cache buffers (k, v)
    [L, B, KV, S, D], into which this `layer`'s keys and values for the T tokens are written at
    slot `index` before attending over the layer's whole slab.
    rows: (start, stop): only these positions query (output [B, stop - start, d]); every
      position still gives its key and value.
    """
    cfg = self.cfg
    start, stop = rows or (0, x.shape[1])
    q = self._proj(x[:, start:stop], "q", _HEADS)
    k, v = self._proj(x, "k", _KV_HEADS), self._proj(x, "v", _KV_HEADS)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      inv_freq = rope_inv_freq(cfg)  # a trace-time constant
      q = apply_rope(q, positions[:, start:stop], inv_freq)
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
    q_slot = index + start + jnp.arange(t)
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
    init = normal(0.02)
    self.up = param(rngs, init, (d, f), ("embed", "mlp"), wd)
    self.down = param(rngs, init, (f, d), ("mlp", "embed"), wd)
    if cfg.gated_mlp:
      self.gate = param(rngs, init, (d, f), ("embed", "mlp"), wd)
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

  def __call__(self, x, positions, key_mask, index, kv=None, layer=None, rows=None):
    """x [B,T,d] -> ([B,T,d], kv); kv, layer and rows as in `Attention.__call__`."""
    x = constrain(x, EMBED)
    y, kv = self.attn(self.attn_norm(x), positions, key_mask, index, kv, layer, rows)
    x = (x if rows is None else x[:, rows[0]:rows[1]]) + y
    return constrain(x + self.mlp(self.mlp_norm(x)), EMBED), kv
