"""Decoder-only transformers (GPT-2, Llama 2/3, Qwen2, Qwen3) as Flax NNX modules.

One implementation, switched by `DecoderConfig`; the parts of a block are in `layers`. Hot code uses
these modules functionally: `graphdef, params = nnx.split(model)` and `nnx.merge(graphdef, params)`
inside jitted pure functions.

The blocks are one `Block` whose parameters carry a leading "layers" axis, applied by one
`jax.lax.scan` (MaxText's `scan_layers`): the program holds one block whatever the depth, so
compile time stays flat in it, and `DecoderConfig.remat` picks what each block keeps for the
backward pass. The KV cache is stacked the same way ([L, B, KV, S, D]) and carried through the scan.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.layers import EMBED, Block, Norm, normal, param
from rlhf_jax.sharding import constrain


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
    self.embed = param(rngs, normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                        ("vocab", "embed"), cfg.weight_dtype)
    if cfg.positions == "learned":
      self.pos_embed = param(rngs, normal(0.01), (cfg.max_position_embeddings, cfg.hidden_size),
                              (None, "embed"), cfg.weight_dtype)
    # Built one by one, then stacked: the same draws from `rngs` as separate blocks would get.
    self.layers = _stack([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, cfg.hidden_size, ("embed",), rngs=rngs)

  def _blocks(self, x, positions, key_mask, index, kv, rows=None):
    """Every block in turn, one `lax.scan` over the stacked parameters: (x, kv).

    rows: (start, stop) of the only positions wanted from the last block (plain forward only,
      `DecoderConfig.last_block_rows`): that block then computes queries, attention output and
      MLP for those rows alone, outside the scan (each earlier block needs every position for
      its keys and values).
    """
    graphdef, stacked = nnx.split(self.layers)

    def block(carry, xs):
      x, kv = carry
      params, layer = xs
      return nnx.merge(graphdef, params)(x, positions, key_mask, index, kv, layer), None

    def last(x, params):
      return nnx.merge(graphdef, params)(x, positions, key_mask, index, rows=rows)[0]

    if kv is None and self.cfg.remat != "none":   # only a plain forward is ever differentiated
      policy = _REMAT_POLICIES[self.cfg.remat]
      # The scan keeps XLA from merging a block's recomputation with its forward; outside it,
      # the last block needs prevent_cse.
      block = jax.checkpoint(block, policy=policy, prevent_cse=False)
      last = jax.checkpoint(last, policy=policy)
    n = self.cfg.num_layers
    if rows is None:
      return jax.lax.scan(block, (x, kv), (stacked, jnp.arange(n, dtype=jnp.int32)))[0]
    first = jax.tree.map(lambda a: a[:-1], stacked)
    x = jax.lax.scan(block, (x, None), (first, jnp.arange(n - 1, dtype=jnp.int32)))[0][0]
    return last(x, jax.tree.map(lambda a: a[-1], stacked)), None

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
    x = constrain(x, EMBED)
    if cache is None:
      index, key_mask, kv = jnp.zeros((), jnp.int32), mask, None
    else:
      index, kv = cache.index, (cache.k, cache.v)
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, index, axis=1)
    rows = keep if cache is None and cfg.last_block_rows else None
    x, kv = self._blocks(x, positions, key_mask, index, kv, rows=rows)
    if keep is not None and rows is None:
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
      self.lm_head = param(rngs, normal(0.02), (cfg.hidden_size, cfg.vocab_size),
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
    init = normal(head_std) if head_std > 0 else jax.nn.initializers.zeros
    self.head = param(rngs, init, (cfg.hidden_size, cfg.num_labels), ("embed", None),
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
