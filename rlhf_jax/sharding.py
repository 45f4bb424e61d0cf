"""Meshes and the mapping from logical axis names to `NamedSharding`s.

Every parameter carries logical axes (`nnx.Param(..., axes=("embed", "mlp"))`), and the model pins
its activations with `constrain(x, ("activation_batch", ...))`; one ordered rules list maps each
logical name to mesh axes (MaxText / Flax `logical_axis_rules` style). A mesh axis
that does not divide a dimension is dropped for that dimension rather than failing, so the same
rules serve a 1-device CPU run and a pod (e.g. 2 kv heads on a tensor axis of 4 are replicated).
"""

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes, in priority order.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    # The scanned blocks' stacking axis: each scan step reads one layer, so it stays whole.
    ("layers", ()),
    # Activations: rows split like the batch, heads / MLP hidden / vocabulary like their weights.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ()),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_head_dim", ()),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
)


class MeshError(ValueError):
  """A mesh shape that does not fit the available devices."""


def make_mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all). `shape` may hold one -1, filled with what is left.

  Default shape: all devices on "data".
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = list(shape) if shape is not None else [n] + [1] * (len(axes) - 1)
  if len(shape) != len(axes):
    raise MeshError(f"mesh shape {tuple(shape)} needs one size per axis {tuple(axes)}")
  if shape.count(-1) > 1:
    raise MeshError(f"mesh shape {tuple(shape)}: at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if known <= 0 or n % known:
      raise MeshError(f"mesh shape {tuple(shape)} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if any(s <= 0 for s in shape) or int(np.prod(shape)) != n:
    raise MeshError(
        f"mesh shape {dict(zip(axes, shape))} needs {int(np.prod(shape))} devices, but {n} "
        f"are available ({jax.devices()[0].platform})")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh | jax.sharding.AbstractMesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one array: each logical name takes its rule's mesh axes that are still
  unused and divide the dimension."""
  if axes is None:
    return P()
  rules = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    chosen = []
    for mesh_axis in rules.get(name, ()) if name is not None else ():
      size = mesh.shape.get(mesh_axis, 1)
      if mesh_axis in used or size == 1:
        continue
      if dim % (size * int(np.prod([mesh.shape[a] for a in chosen] or [1]))) == 0:
        chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """x pinned to the sharding its logical axes get on the current mesh; x itself without one.

  The mesh is the one set by `jax.set_mesh` (or `jax.sharding.use_mesh`) around tracing, so
  model code can call this unconditionally and a single-device run is unchanged.
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of shape {x.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def on_mesh(mesh: Mesh, fn):
  """`fn` called (and so traced) with `mesh` set, so the `constrain`s inside it take effect."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return wrapped


def param_shardings(model_or_state, mesh: Mesh, rules=DEFAULT_RULES):
  """The tree of `nnx.state(model)` (or of a State) with each value replaced by its NamedSharding,
  from the Param's logical axes. Same structure as the params, so it serves `jax.device_put`,
  jit in/out shardings and `optax.tree_map_params` alike."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return jax.tree.map(
      lambda v: v.replace(NamedSharding(
          mesh, logical_to_spec(getattr(v, "axes", None), v.shape, mesh, rules))),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def without_fsdp(rules=DEFAULT_RULES):
  """`rules` with fsdp taken off every parameter's axes (activations and the batch unchanged):
  the layout of weights gathered for decoding, split over the tensor axis only."""
  return tuple((name, axes if name == "batch" or name.startswith("activation_")
                else tuple(a for a in axes if a != "fsdp")) for name, axes in rules)


def gather_fsdp(params: nnx.State, rules=DEFAULT_RULES) -> nnx.State:
  """Every Variable of `params` pinned to its `without_fsdp(rules)` sharding on the current mesh
  (in a jitted function: one all-gather over fsdp per weight, there); unchanged without a mesh."""
  gathered = without_fsdp(rules)
  return jax.tree.map(   # a Variable without logical axes is replicated, as param_shardings does
      lambda v: v.replace(constrain(v.get_value(), getattr(v, "axes", None) or (None,) * len(v.shape),
                                    gathered)),
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Rows split over the batch axes, everything else replicated."""
  batch_axes = tuple(a for a in dict(rules)["batch"] if mesh.shape.get(a, 1) > 1)
  first = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(tree, shardings):
  """`jax.device_put(tree, shardings)` that also works in multi-process runs.

  There a sharding spans other processes' devices, which `device_put` refuses for committed
  arrays; each process holds the same host values (same checkpoint, same seed), so it builds its
  own shards of the global array from its copy (`jax.make_array_from_callback`). `shardings` is
  one Sharding or a tree matching `tree`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)
