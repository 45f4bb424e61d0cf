"""Hugging Face checkpoints in and out: config.json + safetensors, never pickle, never remote code.

Which Hugging Face tensor is which of our parameters, and the reshapes between their layouts, is
the rules table of `hf_rules`; here that table is read (shard by shard onto a mesh) and written.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import fileio
from rlhf_jax.models import hf_rules, safetensors_io
from rlhf_jax.models.config import ConfigError, DecoderConfig, from_hf_config, to_hf_config
from rlhf_jax.models.transformer import CausalLM, ScalarModel
from rlhf_jax.sharding import param_shardings


class CheckpointError(ValueError):
  """A Hugging Face checkpoint directory that cannot be loaded (names the file and problem)."""


def _read_config(path: str) -> dict[str, Any]:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{cfg_file}: missing (a Hugging Face checkpoint needs config.json)")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_file}: expected a JSON object")
  return hf


def _is_scalar_arch(hf: dict[str, Any]) -> bool:
  archs = hf.get("architectures") or []
  return any(a.endswith("ForSequenceClassification") for a in archs)


def _config(path: str, hf: dict[str, Any], **overrides) -> DecoderConfig:
  try:
    return from_hf_config(hf, **overrides)
  except KeyError as e:
    raise CheckpointError(f"{os.path.join(path, 'config.json')}: missing field {e}") from None


def inspect_checkpoint(path: str) -> tuple[DecoderConfig, str]:
  """(config, kind) of a local checkpoint, its weights unread: kind is "scalar" for a
  *ForSequenceClassification checkpoint, else "causal_lm". Raises CheckpointError as
  `from_pretrained` would for a missing or malformed config.json, missing weight files or a
  corrupt safetensors header, so a run can check its checkpoints before it trains anything."""
  hf = _read_config(path)
  cfg = _config(path, hf)
  _open(path)   # reads the headers only
  return cfg, "scalar" if _is_scalar_arch(hf) else "causal_lm"


def _set(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _open(path: str) -> safetensors_io.TensorFiles:
  try:
    return safetensors_io.TensorFiles(safetensors_io.checkpoint_files(path))
  except safetensors_io.SafetensorsError as e:
    raise CheckpointError(str(e)) from None


def _once_per_block(read):
  """`read(index)`, computed once per distinct index: the devices of a process that hold the
  same block (a replicated parameter) share one read of it."""
  blocks: dict[tuple, np.ndarray] = {}

  def callback(index):
    key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
    if key not in blocks:
      blocks[key] = read(index)
    return blocks[key]
  return callback


class _Reader:
  """Our parameter at `our_path` (or any slice of it) from the Hugging Face tensors its rules
  name, converted per layer; a rule that is a plain copy or transpose reads only the slice."""

  def __init__(self, tensors: safetensors_io.TensorFiles, cfg: DecoderConfig,
               entries: list[tuple[str, tuple, int | None, hf_rules.Rule]]):
    self.tensors, self.cfg = tensors, cfg
    self.parts = [(hf_key, rule) for hf_key, _, _, rule in entries]   # one per layer if stacked
    self.stacked = entries[0][2] is not None

  def _part(self, hf_key: str, rule: hf_rules.Rule, rest: tuple) -> np.ndarray:
    """One Hugging Face tensor in our layout, sliced by `rest`."""
    src = self.tensors.array(hf_key)
    if rule.to_ours is hf_rules.same:
      return np.asarray(src[rest], np.float32)
    if rule.to_ours is hf_rules.transpose:
      return np.asarray(src.T[rest], np.float32)
    return rule.to_ours(np.asarray(src, np.float32), self.cfg)[rest]

  def read(self, index: tuple, dtype) -> np.ndarray:
    """Our array's block at `index` (a tuple of slices, as `make_array_from_callback` gives)."""
    if not self.stacked:
      return self._part(*self.parts[0], index).astype(dtype)
    layers = range(len(self.parts))[index[0]]
    return np.stack([self._part(*self.parts[i], index[1:]) for i in layers]).astype(dtype)


def from_pretrained(path: str, *, kind: str | None = None, dtype: str = "float32",
                    param_dtype: str = "float32", shardings=None, mesh=None, **config_overrides):
  """Loads a local Hugging Face checkpoint into a CausalLM or ScalarModel.

  The safetensors files are memory-mapped, never loaded whole. With `mesh` (or `shardings`) every
  parameter is built shard by shard (`jax.make_array_from_callback`): a process reads only the
  slices of each tensor that its own devices hold, so no host holds the whole model, and a
  replicated tensor is read once per process.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    kind: "causal_lm" or "scalar"; by default from config.json `architectures`
      (*ForSequenceClassification -> "scalar"). A causal LM loaded as "scalar" gets a fresh
      zero head (e.g. a critic initialised from the SFT policy).
    dtype: compute dtype ("float32" or "bfloat16").
    param_dtype: storage dtype of the parameters.
    shardings: optional callable(model) -> State of `jax.sharding.Sharding`s for the params.
    mesh: the params placed by their logical axes on this mesh
      (`rlhf_jax.sharding.param_shardings`); ignored when `shardings` is given.
    **config_overrides: DecoderConfig fields to override.

  Raises:
    CheckpointError / ConfigError naming the file and the problem.
  """
  hf = _read_config(path)
  cfg = _config(path, hf, dtype=dtype, param_dtype=param_dtype, **config_overrides)
  if kind is None:
    kind = "scalar" if _is_scalar_arch(hf) else "causal_lm"
  if kind not in ("causal_lm", "scalar"):
    raise ValueError(f"kind must be 'causal_lm' or 'scalar', got {kind!r}")
  scalar = kind == "scalar"
  if scalar:
    head = "score" if _is_scalar_arch(hf) else None
    if head is None:   # a fresh head on an LM trunk: one value/reward output
      cfg = cfg.replace(num_labels=1)
  elif _is_scalar_arch(hf):
    raise CheckpointError(f"{path}: a *ForSequenceClassification checkpoint has no LM head; "
                          "load it with kind='scalar'")
  else:
    head = "lm"
  cls = ScalarModel if scalar else CausalLM
  abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  tensors = _open(path)
  entries: dict[tuple, list] = {}
  want: dict[str, tuple] = {}   # each Hugging Face tensor's shape under this config.json
  expanded = hf_rules.expand(hf_rules.table(cfg, head), cfg)   # layers in order
  for hf_key, our_path, layer, rule in expanded:
    if hf_key not in tensors:
      raise CheckpointError(f"{path}: tensor {hf_key!r} missing from the safetensors files")
    dtype = tensors.dtype(hf_key)
    if not np.issubdtype(dtype, np.floating) and dtype != jnp.bfloat16:
      raise CheckpointError(f"{path}: tensor {hf_key!r} has non-float dtype {dtype}")
    part = _get(pure, our_path).shape[0 if layer is None else 1:]
    # to_hf of an uninitialised array only reshapes views: the shape, without reading anything.
    shape = rule.to_hf(np.empty(part, np.float32), cfg).shape
    if hf_key in want:   # GPT-2 c_attn: q, k, v side by side on the output axis
      shape = want[hf_key][:-1] + (want[hf_key][-1] + shape[-1],)
    want[hf_key] = shape
    entries.setdefault(our_path, []).append((hf_key, our_path, layer, rule))
  for hf_key, our_path, layer, _ in expanded:
    if tensors.shape(hf_key) != want[hf_key]:
      where = ".".join(our_path) + ("" if layer is None else f"[{layer}]")
      raise CheckpointError(
          f"{path}: tensor {hf_key!r} has shape {tensors.shape(hf_key)}, which does not fit "
          f"{where} (Hugging Face shape {want[hf_key]}) for this config.json")
  used = {e[0] for es in entries.values() for e in es}
  # An LM head is unused (not unexpected) when tied or when the trunk feeds a fresh scalar head.
  extra = [k for k in tensors.keys() if k not in used and not hf_rules.IGNORED.search(k)
           and not (k == "lm_head.weight" and (cfg.tie_word_embeddings or head is None))]
  if extra:
    raise CheckpointError(f"{path}: unexpected tensors for {cfg.model_type}: {sorted(extra)[:8]}")
  if shardings is None and mesh is not None:
    shardings = lambda m: param_shardings(m, mesh)
  sh_pure = nnx.to_pure_dict(shardings(abstract)) if shardings is not None else None
  param_dtype = jnp.dtype(cfg.param_dtype)
  for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
    p = tuple(k.key for k in kp)
    shape = tuple(leaf.shape)
    if p not in entries:
      # The only leaf a checkpoint may lack is the scalar head of an LM trunk loaded as
      # "scalar": it starts at zero, like every fresh head here.
      read = lambda index, shape=shape: np.zeros(shape, param_dtype)[index]
    else:
      reader = _Reader(tensors, cfg, entries[p])
      read = lambda index, reader=reader: reader.read(index, param_dtype)
    if sh_pure is None:
      value = jnp.asarray(read(tuple(slice(None) for _ in shape)))
    else:
      value = jax.make_array_from_callback(shape, _get(sh_pure, p), _once_per_block(read))
    _set(pure, p, value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def save_pretrained(model, path: str, *, architecture: str | None = None) -> None:
  """Writes `model` as a Hugging Face checkpoint directory (config.json + model.safetensors).

  The files are written into a sibling directory and renamed into `path` (`fileio.staging_dir`):
  a crash never leaves a half-written file, and whatever else `path` holds (tokenizer files,
  TensorBoard logs, metrics) stays.
  """
  from safetensors.numpy import save_file
  cfg: DecoderConfig = model.cfg
  scalar = isinstance(model, ScalarModel)
  family = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[cfg.model_type]
  if architecture is None:
    architecture = f"{family}ForSequenceClassification" if scalar else (
        "GPT2LMHeadModel" if cfg.model_type == "gpt2" else f"{family}ForCausalLM")
  host = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  tensors = {}
  rules = hf_rules.table(cfg, "score" if scalar else "lm")
  for hf_key, our_path, layer, rule in hf_rules.expand(rules, cfg):
    x = np.asarray(_get(host, our_path), np.float32)
    y = rule.to_hf(x if layer is None else x[layer], cfg)
    if hf_key in tensors:   # GPT-2 c_attn: q, k, v parts arrive in order and are concatenated.
      y = np.concatenate([tensors[hf_key], y], axis=-1)
    tensors[hf_key] = y
  # Written in float32 whatever the training dtype: exact, and every consumer reads it.
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  hf_cfg = to_hf_config(cfg, architecture)
  hf_cfg["dtype"] = "float32"
  with fileio.staging_dir(path) as tmp:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
  # A sharded checkpoint's index would shadow the single file just written.
  stale = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(stale):
    os.remove(stale)


__all__ = ["CheckpointError", "ConfigError", "from_pretrained", "save_pretrained"]
