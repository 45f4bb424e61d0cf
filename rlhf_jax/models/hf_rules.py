"""Hugging Face tensor names <-> our parameter paths, one table of rules per family.

Each rule (MaxText/tunix style) pairs a Hugging Face key pattern with our path and the reshape
between Hugging Face's [out, in] torch Linear layout (or GPT-2's [in, out] Conv1D) and our
[in, heads, head_dim] kernels. The same table drives import and export (`hf`), so the two cannot
drift apart. Hugging Face stores one tensor per layer ({i} in the key); we store the blocks
stacked on a leading layer axis, so layer i's tensor is row i of our array.
"""

import dataclasses
import re
from typing import Callable

import numpy as np

from rlhf_jax.models.config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  """Hugging Face key <-> our path, with layout conversions both ways."""
  hf: str                               # may contain {i} for the layer index
  ours: tuple                           # path; with {i} in `hf`, of a stacked [L, ...] array
  to_ours: Callable[[np.ndarray, DecoderConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, DecoderConfig], np.ndarray]


def same(x, c):
  del c
  return x


def transpose(x, c):
  del c
  return x.T


def _lin_in_heads(heads_attr):
  """torch Linear [H*D, d] -> ours [d, H, D] and back."""
  def to_ours(x, c):
    return x.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

  def to_hf(x, c):
    return x.reshape(c.hidden_size, -1).T
  return to_ours, to_hf


def _bias_heads(heads_attr):
  def to_ours(x, c):
    return x.reshape(getattr(c, heads_attr), c.head_dim)

  def to_hf(x, c):
    del c
    return x.reshape(-1)
  return to_ours, to_hf


def _o_from_linear(x, c):   # torch [d, H*D] -> [H, D, d]
  return x.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_linear(x, c):
  return x.reshape(-1, c.hidden_size).T


def _o_from_conv(x, c):     # Conv1D [H*D, d] -> [H, D, d]
  return x.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_conv(x, c):
  return x.reshape(-1, c.hidden_size)


def _llama_rules(cfg: DecoderConfig) -> list[Rule]:
  q, kv = _lin_in_heads("num_heads"), _lin_in_heads("num_kv_heads")
  qb, kvb = _bias_heads("num_heads"), _bias_heads("num_kv_heads")
  L = "model.layers.{i}."
  D = ("decoder", "layers")
  rules = [
      Rule("model.embed_tokens.weight", ("decoder", "embed"), same, same),
      Rule("model.norm.weight", ("decoder", "final_norm", "scale"), same, same),
      Rule(L + "input_layernorm.weight", D + ("attn_norm", "scale"), same, same),
      Rule(L + "post_attention_layernorm.weight", D + ("mlp_norm", "scale"), same, same),
      Rule(L + "self_attn.q_proj.weight", D + ("attn", "q"), *q),
      Rule(L + "self_attn.k_proj.weight", D + ("attn", "k"), *kv),
      Rule(L + "self_attn.v_proj.weight", D + ("attn", "v"), *kv),
      Rule(L + "self_attn.o_proj.weight", D + ("attn", "o"), _o_from_linear, _o_to_linear),
      Rule(L + "mlp.gate_proj.weight", D + ("mlp", "gate"), transpose, transpose),
      Rule(L + "mlp.up_proj.weight", D + ("mlp", "up"), transpose, transpose),
      Rule(L + "mlp.down_proj.weight", D + ("mlp", "down"), transpose, transpose),
  ]
  if cfg.qkv_bias:
    rules += [Rule(L + "self_attn.q_proj.bias", D + ("attn", "q_bias"), *qb),
              Rule(L + "self_attn.k_proj.bias", D + ("attn", "k_bias"), *kvb),
              Rule(L + "self_attn.v_proj.bias", D + ("attn", "v_bias"), *kvb)]
  if cfg.out_bias:
    rules.append(Rule(L + "self_attn.o_proj.bias", D + ("attn", "o_bias"), same, same))
  if cfg.mlp_bias:
    rules += [Rule(L + f"mlp.{n}_proj.bias", D + ("mlp", f"{n}_bias"), same, same)
              for n in ("gate", "up", "down")]
  if cfg.qk_norm:
    rules += [Rule(L + "self_attn.q_norm.weight", D + ("attn", "q_norm", "scale"), same, same),
              Rule(L + "self_attn.k_norm.weight", D + ("attn", "k_norm", "scale"), same, same)]
  return rules


def _gpt2_rules(cfg: DecoderConfig) -> list[Rule]:
  del cfg
  L = "transformer.h.{i}."
  D = ("decoder", "layers")

  def conv_in_heads(x, c):   # Conv1D [d, H*D] -> [d, H, D]
    return x.reshape(c.hidden_size, c.num_heads, c.head_dim)

  def conv_out_heads(x, c):
    return x.reshape(c.hidden_size, -1)
  bias_heads = _bias_heads("num_heads")
  rules = [
      Rule("transformer.wte.weight", ("decoder", "embed"), same, same),
      Rule("transformer.wpe.weight", ("decoder", "pos_embed"), same, same),
      Rule("transformer.ln_f.weight", ("decoder", "final_norm", "scale"), same, same),
      Rule("transformer.ln_f.bias", ("decoder", "final_norm", "bias"), same, same),
      Rule(L + "attn.c_proj.weight", D + ("attn", "o"), _o_from_conv, _o_to_conv),
      Rule(L + "attn.c_proj.bias", D + ("attn", "o_bias"), same, same),
      Rule(L + "mlp.c_fc.weight", D + ("mlp", "up"), same, same),
      Rule(L + "mlp.c_fc.bias", D + ("mlp", "up_bias"), same, same),
      Rule(L + "mlp.c_proj.weight", D + ("mlp", "down"), same, same),
      Rule(L + "mlp.c_proj.bias", D + ("mlp", "down_bias"), same, same),
  ]
  for hf_ln, ours_ln in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
    rules += [Rule(L + f"{hf_ln}.weight", D + (ours_ln, "scale"), same, same),
              Rule(L + f"{hf_ln}.bias", D + (ours_ln, "bias"), same, same)]
  # c_attn packs q, k, v along the output axis; split on import, concatenated again on export.
  for j, name in enumerate("qkv"):
    def w_in(x, c, j=j):
      return conv_in_heads(np.split(x, 3, axis=1)[j], c)

    def b_in(x, c, j=j):
      return bias_heads[0](np.split(x, 3)[j], c)
    rules += [Rule(L + "attn.c_attn.weight", D + ("attn", name), w_in, conv_out_heads),
              Rule(L + "attn.c_attn.bias", D + ("attn", f"{name}_bias"), b_in, bias_heads[1])]
  return rules


def table(cfg: DecoderConfig, head: str | None) -> list[Rule]:
  """The rules of the trunk plus `head`: "lm", "score" or None (a trunk whose head stays fresh)."""
  rules = _gpt2_rules(cfg) if cfg.model_type == "gpt2" else _llama_rules(cfg)
  if head == "score":
    rules.append(Rule("score.weight", ("head",), transpose, transpose))
  elif head == "lm" and not cfg.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head",), transpose, transpose))
  return rules


def expand(rules: list[Rule], cfg: DecoderConfig):
  """Rules with {i} instantiated for every layer: [(hf_key, our_path, layer or None, rule)]."""
  out = []
  for r in rules:
    layers = range(cfg.num_layers) if "{i}" in r.hf else [None]
    for i in layers:
      out.append((r.hf.format(i=i) if i is not None else r.hf, r.ours, i, r))
  return out


# Keys some exporters write that carry no weights (causal-mask buffers, rotary caches).
IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")
