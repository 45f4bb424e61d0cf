"""LoRA adapters on the decoder's projections (Hu et al. 2021), and their export.

A targeted projection W (q/k/v/o, gate/up/down) computes W x + (alpha / r) B A x: A [in, r] and
B [r, out] are `LoRAParam`s of an `Adapter` that sits beside W in its module as `<name>_lora`
(`attn.q_lora`), so the forward adds the low-rank term where the adapter exists and is unchanged
where it does not. The blocks are stacked on a leading "layers" axis and scanned
(`transformer.Decoder`), so each adapter is too: A [L, *in, r] carries W's input axes, B
[L, r, *out] its output axes, and both take W's sharding (`sharding.param_shardings`).
A ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0: a fresh adapter gives the base's
outputs exactly. No dropout: in RL the sampling and the trained policy must be one function.

Working with a model:
  model = lora.add_adapters(base_model, cfg, key)      # shares the base's weight arrays
  graphdef, frozen, trainable = lora.split(model)      # trainable: adapters (+ a scalar head)
  nnx.merge(graphdef, frozen, trainable)               # the adapted model again
  ref_graphdef, ref_params = lora.base(model)          # adapters off: the frozen base itself
  lora.merged(model)                                   # W + (alpha/r) B A, adapters removed
  lora.save_peft(model, path)                          # a PEFT adapter directory
"""

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.transformer import CausalLM, ScalarModel

# Our projection names (module.attribute) and the Hugging Face Llama/Qwen module each one is.
PROJECTIONS = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
               "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
# The whole weights `modules_to_save` can train, and the PEFT module name of each.
SAVABLE = {"lm_head": "lm_head", "embed": "model.embed_tokens"}
# Leading weight dimensions that are the projection's input (o: [heads, head_dim] -> embed).
_IN_DIMS = {"attn.o": 2}


def _matching(field: str, regex: str, names) -> None:
  """Raises unless `regex` compiles and (given `names`) fully matches one of them."""
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise ValueError(f"lora.{field} {regex!r} is not a regex: {e}") from None
  if names and not any(pattern.fullmatch(n) for n in names):
    raise ValueError(f"lora.{field} {regex!r} matches none of {', '.join(names)}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the trained models of a stage; the base weights stay frozen.

  Attributes:
    rank: r, the adapters' rank; 0 turns LoRA off (full fine-tuning).
    alpha: The adapter's output is scaled by alpha / r (Hu et al. 2021).
    target_modules: Regex fully matched against the projection names attn.q, attn.k, attn.v,
      attn.o, mlp.gate, mlp.up, mlp.down (e.g. "attn\\.(q|v)" for the paper's choice); each
      match gets an adapter in every layer.
    modules_to_save: Regex fully matched against "lm_head" and "embed": each match is trained
      in full, as a copy beside the frozen original (PEFT's `modules_to_save`), so the
      adapters-off reference still has the base weight. "" (the default): adapters only. The
      output head is what moves the logits most directly: below a frozen head, adapters can
      only steer the normalised hidden state.
  """
  rank: int = 0
  alpha: float = 16.0
  target_modules: str = r"attn\.(q|k|v|o)|mlp\.(gate|up|down)"
  modules_to_save: str = ""

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank must be >= 0 (0: off), got {self.rank}")
    if self.alpha <= 0:
      raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
    # Off (rank 0), the regex must still parse but need not match anything.
    _matching("target_modules", self.target_modules, PROJECTIONS if self.rank else ())
    if self.modules_to_save:
      _matching("modules_to_save", self.modules_to_save, SAVABLE)
      if not self.rank:
        raise ValueError("lora.modules_to_save needs lora.rank > 0 (LoRA on)")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoRAParam(nnx.Param):
  """A trainable adapter weight; every other Param of an adapted model is frozen."""


class SavedParam(nnx.Param):
  """A trained full copy of a base weight (`modules_to_save`), read in its place by the model
  (`transformer._weight`); the base weight beside it stays frozen."""


class Adapter(nnx.Module):
  """The low-rank update of one projection, stacked over layers: a [L, *in, r], b [L, r, *out]."""

  def __init__(self, a: nnx.Param, b: nnx.Param, scale: float):
    self.a, self.b, self.scale = a, b, scale

  def __call__(self, x: jax.Array, contract: str = "...i,ir->...r") -> jax.Array:
    """(alpha/r) (x A) B for one layer's slice: x [..., in] -> [..., prod(out)] (flattened)."""
    a, b = self.a[...].astype(x.dtype), self.b[...]
    h = jnp.einsum(contract, x, a)
    return self.scale * (h @ b.reshape(b.shape[0], -1).astype(x.dtype))


def _owners(model) -> dict[str, tuple[nnx.Module, str]]:
  """Projection name -> (module holding its weight, attribute) of a CausalLM / ScalarModel."""
  if not isinstance(model, (CausalLM, ScalarModel)):
    raise TypeError(f"LoRA adapts CausalLM and ScalarModel, got {type(model).__name__}")
  layers = model.decoder.layers
  out = {}
  for name in PROJECTIONS:
    module, attr = name.split(".")
    owner = getattr(layers, module)
    if hasattr(owner, attr):   # GPT-2-style MLPs have no gate
      out[name] = (owner, attr)
  return out


def _savable_owners(model) -> dict[str, tuple[nnx.Module, str]]:
  """`SAVABLE` name -> (module holding the weight, attribute), for the weights `model` has
  (a tied or a scalar head has no lm_head)."""
  out = {"embed": (model.decoder, "embed")}
  if isinstance(model, CausalLM) and not model.cfg.tie_word_embeddings:
    out["lm_head"] = (model, "lm_head")
  return out


def targets(model, cfg: LoRAConfig) -> list[str]:
  """The projection names of `model` that `cfg.target_modules` fully matches."""
  pattern = re.compile(cfg.target_modules)
  return [n for n in _owners(model) if pattern.fullmatch(n)]


def _copy_structure(model):
  """A new module graph, new Variables, over the same arrays (no array is copied)."""
  return nnx.merge(*nnx.split(model), copy=True)


def add_adapters(model, cfg: LoRAConfig, key: jax.Array):
  """`model` with an Adapter on each targeted projection; the base's arrays are shared, not
  copied, and `model` itself is left as it was."""
  if not cfg.enabled:
    raise ValueError("add_adapters needs lora.rank > 0")
  model = _copy_structure(model)
  names = targets(model, cfg)
  for i, name in enumerate(names):
    owner, attr = _owners(model)[name]
    w = getattr(owner, attr)
    k = _IN_DIMS.get(name, 1)
    in_shape, out_shape = w.shape[1:1 + k], w.shape[1 + k:]
    layers_axis, in_axes, out_axes = w.axes[:1], w.axes[1:1 + k], w.axes[1 + k:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(jax.random.fold_in(key, i), (w.shape[0], *in_shape, cfg.rank),
                           jnp.float32, -bound, bound)
    b = jnp.zeros((w.shape[0], cfg.rank, *out_shape), jnp.float32)
    setattr(owner, f"{attr}_lora", Adapter(
        LoRAParam(a, axes=layers_axis + in_axes + (None,)),
        LoRAParam(b, axes=layers_axis + (None,) + out_axes), cfg.scale))
  if cfg.modules_to_save:
    pattern = re.compile(cfg.modules_to_save)
    owners = _savable_owners(model)
    if isinstance(model, CausalLM) and pattern.fullmatch("lm_head") and "lm_head" not in owners:
      raise ValueError("lora.modules_to_save: this model ties lm_head to embed; save embed")
    for name, (owner, attr) in owners.items():
      if pattern.fullmatch(name):
        w = getattr(owner, attr)
        # A new float32 buffer: the copy is trained (and donated), the original never is.
        setattr(owner, f"{attr}_saved", SavedParam(jnp.array(w[...], jnp.float32), axes=w.axes))
  return model


def adapters(model) -> dict[str, Adapter]:
  """Projection name -> its Adapter, for the adapted projections of `model`."""
  return {n: getattr(o, f"{a}_lora") for n, (o, a) in _owners(model).items()
          if hasattr(o, f"{a}_lora")}


def saved(model) -> dict[str, SavedParam]:
  """`SAVABLE` name -> its trained copy, for the weights of `model` that `modules_to_save` chose."""
  return {n: getattr(o, f"{a}_saved") for n, (o, a) in _savable_owners(model).items()
          if hasattr(o, f"{a}_saved")}


# What LoRA trains: the adapters, the saved copies, and a ScalarModel's head (a critic's value
# head is new and tiny; PEFT's `modules_to_save=["score"]` does the same). A CausalLM has no
# "head" key.
TRAINABLE = nnx.Any(LoRAParam, SavedParam, nnx.PathContains("head"))


def has_adapters(params) -> bool:
  """Whether a State holds adapter weights."""
  return isinstance(params, nnx.State) and any(
      isinstance(v, LoRAParam) for v in jax.tree.leaves(
          params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def split(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, frozen base State, trainable State); `nnx.merge` of all three is `model`."""
  return nnx.split(model, nnx.Not(TRAINABLE), ...)


def partition(params: dict) -> tuple[dict, dict]:
  """{name: State | other} -> (frozen, trainable): each State holding adapters is split into its
  frozen base and its trainable part (`TRAINABLE`); anything else is trainable as it is, with
  None as its frozen part (full fine-tuning)."""
  frozen, trainable = {}, {}
  for k, v in params.items():
    if has_adapters(v):
      frozen[k], trainable[k] = nnx.split_state(v, nnx.Not(TRAINABLE), ...)
    else:
      frozen[k], trainable[k] = None, v
  return frozen, trainable


def join(frozen: dict | None, trainable: dict) -> dict:
  """The inverse of `partition`: whole States again (a pytree regrouping, no copy under jit)."""
  if frozen is None:
    return trainable
  return {k: v if frozen.get(k) is None else nnx.merge_state(frozen[k], v)
          for k, v in trainable.items()}


def without_adapters(model):
  """`model` with its adapters removed (its base weights as they are, shared)."""
  model = _copy_structure(model)
  for owner, attr in _owners(model).values():
    if hasattr(owner, f"{attr}_lora"):
      delattr(owner, f"{attr}_lora")
  for owner, attr in _savable_owners(model).values():
    if hasattr(owner, f"{attr}_saved"):
      delattr(owner, f"{attr}_saved")
  return model


def base(model) -> tuple[nnx.GraphDef, nnx.State]:
  """The adapters-off view (graphdef, params): the frozen base model, e.g. the reference policy
  of PPO or DPO under LoRA. Its params are the base arrays of `model` (`split(model)[1]` is the
  same tree), so no second copy of the weights exists."""
  return nnx.split(without_adapters(model))


def delta(adapter: Adapter) -> jax.Array:
  """(alpha/r) A B per layer, [L, *in, *out]: what merging adds to the projection's weight."""
  a, b = adapter.a[...], adapter.b[...]
  r = a.shape[-1]
  d = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, r), b.reshape(b.shape[0], r, -1))
  return adapter.scale * d.reshape(a.shape[:-1] + b.shape[2:])


def merged(model):
  """The base model with every adapter folded into its weight: W + (alpha/r) A B (new arrays;
  `model` is unchanged). `models.save_pretrained` writes it as a full checkpoint."""
  deltas = {n: delta(ad) for n, ad in adapters(model).items()}
  copies = {n: v[...] for n, v in saved(model).items()}
  out = without_adapters(model)
  for name, (owner, attr) in _owners(out).items():
    if name in deltas:
      w = getattr(owner, attr)
      w.set_value((w[...].astype(jnp.float32) + deltas[name]).astype(w.dtype))
  for name, (owner, attr) in _savable_owners(out).items():
    if name in copies:
      w = getattr(owner, attr)
      w.set_value(copies[name].astype(w.dtype))
  return out


def save_peft(model, path: str, base_model_name_or_path: str | None = None) -> None:
  """Writes a PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.

  Keys follow PEFT for Llama/Qwen causal LMs (`base_model.model.model.layers.N.self_attn.q_proj.
  lora_A.weight` [r, in], `...lora_B.weight` [out, r]; a saved module's whole weight as
  `base_model.model.lm_head.weight`); `peft.PeftModel.from_pretrained` loads it onto the
  transformers base model. Built beside `path` and renamed into place.
  """
  from safetensors.numpy import save_file
  cfg = model.cfg
  if not isinstance(model, CausalLM) or cfg.model_type not in ("llama", "qwen2", "qwen3"):
    raise ValueError(f"PEFT export supports Llama/Qwen causal LMs, got {type(model).__name__} "
                     f"{cfg.model_type!r} (export merged weights with lora.merged instead)")
  found = adapters(model)
  if not found:
    raise ValueError("the model has no adapters to export")
  tensors, alpha_over_r = {}, set()
  for name, ad in found.items():
    a, b = np.asarray(jax.device_get(ad.a[...]), np.float32), np.asarray(
        jax.device_get(ad.b[...]), np.float32)
    r = a.shape[-1]
    alpha_over_r.add((ad.scale, r))
    for i in range(a.shape[0]):
      key = f"base_model.model.model.layers.{i}.{PROJECTIONS[name]}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  copies = saved(model)
  for name, v in copies.items():   # PEFT stores a saved module's weight under its own name
    w = np.asarray(jax.device_get(v[...]), np.float32)
    tensors[f"base_model.model.{SAVABLE[name]}.weight"] = np.ascontiguousarray(
        w.T if name == "lm_head" else w)   # ours [d, V], torch's Linear [V, d]
  if len(alpha_over_r) != 1:
    raise ValueError(f"adapters of different scale/rank {sorted(alpha_over_r)} cannot be one "
                     "PEFT config")
  (scale, r), = alpha_over_r
  config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=scale * r,
                lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False,
                inference_mode=True, init_lora_weights=True,
                modules_to_save=sorted(SAVABLE[n].split(".")[-1] for n in copies) or None,
                target_modules=sorted(PROJECTIONS[n].split(".")[1] for n in found),
                base_model_name_or_path=base_model_name_or_path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if os.path.isdir(path):
      old = path + ".old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
