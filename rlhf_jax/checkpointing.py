"""Resumable runs: Orbax checkpoints of a train state plus the host state around it (PPO and the
supervised loop).

A checkpoint at step s holds two items (Orbax `CheckpointManager` layout `<dir>/<s>/{state,meta}`):

- `state`: every array of the `TrainState` pytree (params, optimizer state, KL controller, step, and
  the PRNG key as its raw key data), as a nested dict keyed by the pytree path, so the files name
  what they hold and a mismatch can be reported by name.
- `meta`: JSON with what lives on the host: the prompt iterator position, the reward
  normalisation gain/bias, the config fingerprint, the last evaluation and the number of
  metrics records written, so a resumed run continues exactly where the saved one was.

Saves are asynchronous (the device-to-host copy blocks, the file writes run in the background),
every `every` steps, keeping the newest `keep`. Orbax writes into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint as the newest one; a
numbered step that still cannot be read (files lost after the rename) is set aside on restore
and the previous one used.
"""

import dataclasses
import json
import logging as std_logging
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

FORMAT_VERSION = 1

# PPOTrainerConfig fields a run may change between a save and its resumption (budget, logging and
# checkpoint cadence); every other field must match, or the checkpoint belongs to another run.
RESUMABLE_FIELDS = ("max_steps", "reward_threshold", "eval_every", "num_eval_prompts",
                    "num_samples_logged", "log_every_s", "checkpoint_every", "keep_checkpoints",
                    "max_nonfinite_iterations", "optim.total_steps")


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO lines (dozens per save); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


_QUIET_ORBAX = _QuietOrbax()


class CheckpointMismatchError(ValueError):
  """A checkpoint in the run directory does not belong to this run (other shapes or config)."""


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaf_name(path: Sequence[Any]) -> str:
  return "/".join(_key_name(e) for e in path)


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _nest(named_leaves: Iterable[tuple[str, Any]]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, leaf in named_leaves:
    *parents, last = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def _flatten_named(tree: Any) -> dict[str, Any]:
  return {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_to_tree(state: Any) -> dict[str, Any]:
  """The arrays of a pytree as a nested dict keyed by path; typed PRNG keys become key data."""
  return _nest((_leaf_name(p), jax.random.key_data(x) if _is_key(x) else x)
               for p, x in jax.tree_util.tree_flatten_with_path(state)[0])


def tree_to_state(tree: dict[str, Any], like: Any) -> Any:
  """Inverse of `state_to_tree`: rebuilds `like`'s pytree (static fields included) from `tree`."""
  flat = _flatten_named(tree)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, ref in leaves:
    x = flat[_leaf_name(path)]
    out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref) else x)
  return jax.tree_util.tree_unflatten(treedef, out)


def abstract_leaves(state: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """{path name: ShapeDtypeStruct with the live array's sharding} in the state's leaf order; nested
  by `_nest`, the restore target, so restored arrays land directly on the state's shardings."""
  def spec(x):
    data = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
  return {_leaf_name(p): spec(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def config_fingerprint(cfg: Any, ignore: Sequence[str] = RESUMABLE_FIELDS) -> dict[str, Any]:
  """The config dataclass flattened to {"a.b": value} (JSON types), without the `ignore` fields."""
  flat: dict[str, Any] = {}

  def walk(prefix: str, value: Any):
    if dataclasses.is_dataclass(value):
      for f in dataclasses.fields(value):
        walk(f"{prefix}{f.name}.", getattr(value, f.name))
    else:
      key = prefix[:-1]
      if key not in ignore:
        flat[key] = json.loads(json.dumps(value, default=repr))

  walk("", cfg)
  return flat


def _describe(x: Any) -> str:
  return f"{tuple(x.shape)} {np.dtype(x.dtype).name}"


def shape_mismatches(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
  """Human-readable differences between two {name: array-like} maps of shapes and dtypes, in the
  order of `expected` (parameters before optimizer state)."""
  out = []
  for k, b in expected.items():
    if k not in saved:
      out.append(f"{k} is missing from the checkpoint")
    elif tuple(saved[k].shape) != tuple(b.shape) or np.dtype(saved[k].dtype) != np.dtype(b.dtype):
      out.append(f"{k} is {_describe(saved[k])} in the checkpoint but {_describe(b)} in this run")
  return out + [f"{k} is in the checkpoint but not in this run"
                for k in saved if k not in expected]


def fingerprint_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(saved.keys() | current.keys())
  return [f"{k}={saved.get(k, '<unset>')!r} in the checkpoint but {current.get(k, '<unset>')!r} "
          "in this run" for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]


class Checkpointer:
  """Periodic asynchronous checkpoints of a train state and its host-side metadata.

  Args:
    directory: Where the numbered checkpoints live (created on the first save).
    every: Save every this many steps (0: only when `save(..., force=True)`).
    keep: Keep the newest this many checkpoints.
    fingerprint: `config_fingerprint` of the run; a checkpoint saved under another one is refused.
    async_save: Write files in a background thread.
  """

  def __init__(self, directory: str, *, every: int, keep: int, fingerprint: dict[str, Any],
               async_save: bool = True):
    if every < 0 or keep < 1:
      raise ValueError(f"checkpoint_every must be >= 0 and keep_checkpoints >= 1, got {every}, "
                       f"{keep}")
    self.directory = os.path.abspath(directory)   # Orbax wants absolute paths
    self.every = every
    self.fingerprint = fingerprint
    logging.get_absl_logger().addFilter(_QUIET_ORBAX)   # a no-op when already added
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                             enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """Newest complete checkpoint (an interrupted save is never listed)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _check(self, step: int, expected: dict[str, Any], meta: dict[str, Any],
             saved: dict[str, Any]) -> None:
    where = f"{self.directory}/{step}"
    hint = ("; it belongs to another run: use a fresh workdir, or delete the checkpoints to "
            "start over")
    if meta.get("format") != FORMAT_VERSION:
      raise CheckpointMismatchError(f"checkpoint {where} has format {meta.get('format')!r}, "
                                    f"expected {FORMAT_VERSION}{hint}")
    problems = shape_mismatches(saved, expected)
    problems = problems or fingerprint_mismatches(meta.get("fingerprint", {}), self.fingerprint)
    if problems:
      more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match this run: {'; '.join(problems[:3])}{more}{hint}")

  def restore(self, state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, metadata) of the newest readable checkpoint, or None when there is none.

    `state` gives the structure, static fields, shapes and shardings; its arrays are not read.
    A newest step that cannot be read (files missing or cut short: a copy or disk that failed
    mid-write) is renamed `<step>.incomplete` and the previous step is tried. Raises
    CheckpointMismatchError (nothing read, nothing written) when the newest checkpoint was saved
    by a run with other shapes, dtypes or config.
    """
    target = abstract_leaves(state)
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = _flatten_named(self._manager.item_metadata(step)["state"].tree)
      except Exception as e:   # pylint: disable=broad-except  (Orbax raises many kinds)
        self._set_aside(step, e)
        continue
      self._check(step, target, meta, saved)
      try:
        tree = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_nest(target.items()))))["state"]
      except Exception as e:   # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      logging.info("restored checkpoint %s/%d", self.directory, step)
      return tree_to_state(tree, state), meta
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable step out of the numbered ones (kept for inspection, never deleted)
    so the previous step becomes the newest."""
    src = os.path.join(self.directory, str(step))
    dst = src + ".incomplete"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.incomplete{n}", n + 1
    logging.warning("checkpoint %s cannot be read (%s: %s); moved to %s, falling back to the "
                    "previous one", src, type(error).__name__, str(error).splitlines()[0][:200],
                    dst)
    if jax.process_index() == 0:
      os.replace(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint set aside {src}")
    self._manager.reload()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, metadata: dict[str, Any], force: bool = False) -> bool:
    """Starts saving (state, metadata) as checkpoint `step` when due (or forced); returns whether
    a save started. Returns as soon as the arrays are copied off the device, so `state` may be
    donated right after."""
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    meta = {"format": FORMAT_VERSION, "step": int(step), "fingerprint": self.fingerprint,
            **metadata}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_tree(state)), meta=ocp.args.JsonSave(meta)),
        force=True)
    return True

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
