"""One config for every decoder family, and its translation from/to Hugging Face configs.

The families differ only in a handful of switches (norm type, position encoding, MLP gating, biases,
q/k norm, tied head), so one `DecoderConfig` and one module implementation cover GPT-2, Llama 2/3,
Qwen2 and Qwen3. `from_hf_config` reads a `config.json` dict; `to_hf_config` writes one that
transformers loads.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "save_all_dots", "save_dots", "full", "offload")

# The switches each family's Hugging Face config implies (transformers' config defaults): what a
# `DecoderConfig` field left at None takes from its `model_type`.
_ROPE_FAMILY = dict(norm="rmsnorm", norm_eps=1e-6, activation="silu", gated_mlp=True,
                    positions="rope", qkv_bias=False, out_bias=False, mlp_bias=False,
                    qk_norm=False, tie_word_embeddings=False)
FAMILY_DEFAULTS = {
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
                 positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                 qk_norm=False, tie_word_embeddings=True),
    "llama": _ROPE_FAMILY,
    "qwen2": dict(_ROPE_FAMILY, qkv_bias=True),
    "qwen3": dict(_ROPE_FAMILY, qk_norm=True),
}
# What each family's config.json can express: every switch it fixes, and the values its free
# ones may take (llama's attention_bias sets q/k/v and output biases together).
_EXPORTABLE = {
    "gpt2": dict(norm=("layernorm",), activation=("gelu_new", "gelu"), gated_mlp=(False,),
                 positions=("learned",), qkv_bias=(True,), out_bias=(True,), mlp_bias=(True,),
                 qk_norm=(False,)),
    "llama": dict(norm=("rmsnorm",), activation=("silu",), gated_mlp=(True,),
                  positions=("rope",), qk_norm=(False,)),
    "qwen2": dict(norm=("rmsnorm",), activation=("silu",), gated_mlp=(True,),
                  positions=("rope",), qkv_bias=(True,), out_bias=(False,), mlp_bias=(False,),
                  qk_norm=(False,)),
    "qwen3": dict(norm=("rmsnorm",), activation=("silu",), gated_mlp=(True,),
                  positions=("rope",), qkv_bias=(False,), out_bias=(False,), mlp_bias=(False,),
                  qk_norm=(True,)),
}


class ConfigError(ValueError):
  """A model config that rlhf_jax cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyperparameters of a decoder-only transformer.

  Attributes:
    model_type: Hugging Face `model_type` of the family ("gpt2", "llama", "qwen2", "qwen3").
    vocab_size: Embedding rows.
    hidden_size: Model width d.
    num_layers: Transformer blocks.
    num_heads: Query heads.
    num_kv_heads: Key/value heads (GQA when < num_heads).
    head_dim: Per-head width.
    intermediate_size: MLP hidden width.
    max_position_embeddings: Learned-position table size (GPT-2) / nominal context (RoPE).

    The family switches below (norm ... tie_word_embeddings) left at None take `model_type`'s
    values (`FAMILY_DEFAULTS`: GPT-2 learned positions, LayerNorm, biases, GELU and a tied head;
    Qwen2 q/k/v biases; Qwen3 q/k norm); a value given explicitly wins.
    norm: "layernorm" (with bias) or "rmsnorm".
    norm_eps: Epsilon of the norms.
    activation: "gelu_new" (tanh approximation), "gelu" or "silu".
    gated_mlp: SwiGLU-style gate/up/down MLP (Llama) instead of fc/proj (GPT-2).
    positions: "learned" (GPT-2 wpe) or "rope".
    rope_theta: RoPE base frequency.
    rope_scaling: Hugging Face `rope_parameters` fields beyond theta, as a tuple of (key, value)
      pairs so the config stays hashable (supported rope_type: default, linear, llama3).
    qkv_bias: Biases on q/k/v projections (GPT-2, Qwen2, Llama attention_bias).
    out_bias: Bias on the attention output projection (GPT-2, Llama attention_bias).
    mlp_bias: Biases in the MLP (GPT-2, Llama mlp_bias).
    qk_norm: RMSNorm on each query/key head before RoPE (Qwen3).
    tie_word_embeddings: LM head shares the embedding matrix.
    pad_token_id, bos_token_id, eos_token_id: Special ids from the checkpoint (may be None).
    num_labels: Outputs of the scalar head for *ForSequenceClassification checkpoints.
    dtype: Compute dtype (activations, matmuls); params keep `param_dtype`.
    param_dtype: Storage dtype of parameters.
    remat: What each block keeps for the backward pass (`jax.checkpoint` per scanned block):
      "none" keeps every activation; "save_all_dots" keeps every matmul's output (attention
      scores included, `checkpoint_dots`) and recomputes only the elementwise ops between them:
      the default, keeping less than "none" for a few cheap elementwise recomputations, and on
      XLA:CPU faster than "none", whose many stacked residuals the layer scan copies; "full" keeps only the block's input
      and recomputes the rest; "save_dots" keeps the outputs of matmuls without batch dimensions (the projections and MLP,
      `dots_with_no_batch_dims_saveable`) and recomputes the rest; "offload" keeps the same
      outputs in pinned host memory instead of device memory. A training setting of this
      library, not of the checkpoint: it is never written to config.json.
    logits_chunk_size: Positions whose LM-head logits exist at once when log-probs and
      entropies are computed for scoring and PPO (`logprobs.chunked_token_logprobs`): at V = 128k
      the float32 [B, N, V] logits would be a minibatch's largest tensor. Like `remat`, never
      written to config.json.
    last_block_rows: When only some positions' hidden states are wanted (`keep`: the
      completion positions of scoring and of the PPO update), the last block computes its
      queries, attention output and MLP for those rows only (about 10% of a 4-block trunk's
      FLOPs when half the sequence is prompt). The last block then runs outside the layer scan,
      and under fsdp its gathered weights and full-size weight gradients outlive a scanned
      block's (Llama-3-8B shapes, fsdp 64, 4 layers: 11.8 against 6.8 GiB of temporaries per
      device): off by default, for small models whose update is bound by FLOPs rather than
      memory. A compute setting like `remat`, never written to config.json.
  """

  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  intermediate_size: int = 256
  max_position_embeddings: int = 2048
  norm: str | None = None
  norm_eps: float | None = None
  activation: str | None = None
  gated_mlp: bool | None = None
  positions: str | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  qkv_bias: bool | None = None
  out_bias: bool | None = None
  mlp_bias: bool | None = None
  qk_norm: bool | None = None
  tie_word_embeddings: bool | None = None
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  num_labels: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "save_all_dots"
  logits_chunk_size: int = 256
  last_block_rows: bool = False

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name, value in FAMILY_DEFAULTS[self.model_type].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "max_position_embeddings", "num_labels"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.norm_eps > 0:
      raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ConfigError(f"{name} {getattr(self, name)!r} is not a dtype") from None
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for name in ("norm", "activation", "positions", "remat"):
      allowed = {"norm": ("layernorm", "rmsnorm"), "activation": ("gelu_new", "gelu", "silu"),
                 "positions": ("learned", "rope"), "remat": REMAT_POLICIES}[name]
      if getattr(self, name) not in allowed:
        raise ConfigError(f"{name}={getattr(self, name)!r} not in {allowed}")
    if self.logits_chunk_size < 1:
      raise ConfigError(f"logits_chunk_size must be >= 1, got {self.logits_chunk_size}")
    rope_type = dict(self.rope_scaling).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
      raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)


def check_exportable(cfg: DecoderConfig) -> None:
  """Raises ConfigError unless `to_hf_config` can write `cfg` as its family's config.json (so
  a model trained from scratch can be exported and loaded back, by rlhf_jax and transformers)."""
  for name, allowed in _EXPORTABLE[cfg.model_type].items():
    if getattr(cfg, name) not in allowed:
      raise ConfigError(
          f"model_type={cfg.model_type!r} cannot be exported with {name}={getattr(cfg, name)!r} "
          f"(its config.json allows {' or '.join(map(repr, allowed))}; leave {name} unset for "
          "the family's default)")
  if cfg.model_type == "llama" and cfg.qkv_bias != cfg.out_bias:
    raise ConfigError(f"model_type='llama' has one attention_bias: qkv_bias={cfg.qkv_bias} and "
                      f"out_bias={cfg.out_bias} must be equal")
  if cfg.model_type == "gpt2":
    if cfg.num_kv_heads != cfg.num_heads:
      raise ConfigError(f"model_type='gpt2' has no grouped-query attention: num_kv_heads="
                        f"{cfg.num_kv_heads} must equal num_heads={cfg.num_heads} (set "
                        f"num_kv_heads={cfg.num_heads})")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
      raise ConfigError(f"model_type='gpt2' needs num_heads * head_dim == hidden_size, got "
                        f"{cfg.num_heads} * {cfg.head_dim} != {cfg.hidden_size}")
    if cfg.rope_scaling:
      raise ConfigError("model_type='gpt2' has learned positions: rope_scaling must be empty")


def _get(d: dict[str, Any], *keys, default=None):
  for k in keys:
    if d.get(k) is not None:
      return d[k]
  return default


def _ids(v):
  return tuple(v) if isinstance(v, list) else v


def from_hf_config(hf: dict[str, Any], **overrides) -> DecoderConfig:
  """Builds a DecoderConfig from a Hugging Face `config.json` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(
        f"unsupported model_type {model_type!r} in config.json; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  common = dict(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      pad_token_id=hf.get("pad_token_id"),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_ids(hf.get("eos_token_id")),
      num_labels=len(hf.get("id2label") or {0: 0, 1: 1}),
  )
  if model_type == "gpt2":
    d, h = hf["n_embd"], hf["n_head"]
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
      raise ConfigError("GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                        "are not supported")
    cfg = DecoderConfig(
        **common, hidden_size=d, num_layers=hf["n_layer"], num_heads=h, num_kv_heads=h,
        head_dim=d // h, intermediate_size=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation={"gelu_new": "gelu_new", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new"}.get(
            hf.get("activation_function", "gelu_new"), "unsupported"),
        gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True))
  else:
    if hf.get("use_sliding_window"):
      raise ConfigError(f"{model_type}: sliding-window attention is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{model_type}: hidden_act {hf.get('hidden_act')!r} is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    h = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    cfg = DecoderConfig(
        **common, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=h, num_kv_heads=_get(hf, "num_key_value_heads", default=h),
        head_dim=_get(hf, "head_dim", default=hf["hidden_size"] // h),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True,
        positions="rope", rope_theta=float(theta),
        rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
        qkv_bias=attention_bias or model_type == "qwen2", out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return cfg.replace(**overrides) if overrides else cfg


def to_hf_config(cfg: DecoderConfig, architecture: str) -> dict[str, Any]:
  """The `config.json` dict transformers needs to rebuild `cfg` as `architecture`."""
  check_exportable(cfg)
  common = dict(
      architectures=[architecture], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
      pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
      eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
      tie_word_embeddings=cfg.tie_word_embeddings, dtype=cfg.param_dtype)
  if architecture.endswith("ForSequenceClassification"):
    common["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    common["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
  if cfg.model_type == "gpt2":
    return dict(
        common, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  rope = dict(cfg.rope_scaling)
  rope.setdefault("rope_type", "default")
  rope["rope_theta"] = cfg.rope_theta
  out = dict(
      common, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
      hidden_act="silu", rope_parameters=rope, attention_dropout=0.0)
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  return out
