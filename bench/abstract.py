"""Abstract inputs for `bench/scale.py`: ShapeDtypeStructs carrying shardings, so programs lower
and compile for pod-sized models while nothing is allocated."""

import jax
from flax import nnx

from rlhf_jax import sharding as sharding_lib


def sharded(tree, shardings):
  """`tree`'s arrays as ShapeDtypeStructs carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def rows_sharded(tree, mesh):
  """Abstract arrays with their rows over the batch axes (scalars replicated)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
      sharding_lib.batch_sharding(mesh, x.ndim) if x.ndim else sharding_lib.replicated(mesh))),
      tree)


def abstract_model(cls, cfg, mesh, seed: int):
  """(graphdef, abstract params on their logical-axis shardings) of `cls(cfg)`, never built."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))
  return graphdef, sharded(state, sharding_lib.param_shardings(state, mesh))


def param_bytes(state) -> int:
  """Bytes of every array of `state`, as stored (global, not per device)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
