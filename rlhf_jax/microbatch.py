"""Gradient accumulation: one optimizer step's batch as a `lax.scan` over microbatches.

Only one microbatch's activations are live at a time, so the peak memory of a step falls with the
microbatch size while its update does not change: the callers scale each microbatch's loss by its
share of the batch's normalizer (`losses.NORMALIZERS`, `supervised.make_train_step`) so that the
sum over microbatches is the batch's loss.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

Out = TypeVar("Out")


def num_rows(batch: Any) -> int:
  """The shared leading dimension of the arrays of `batch`."""
  rows = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(rows) != 1:
    raise ValueError(f"batch arrays must share their leading (row) dimension, got {sorted(rows)}")
  return rows.pop()


def split(batch: Any, micro_batch_size: int) -> Any:
  """`batch` with rows [R, ...] as [R / micro_batch_size, micro_batch_size, ...] microbatches.

  Microbatch j holds rows j, j + num_micro, j + 2 num_micro, ...: with the rows sharded over the
  data axes each microbatch stays spread over all of them, where consecutive blocks of rows would
  each sit on a few devices.

  Raises:
    ValueError: if micro_batch_size does not divide the rows.
  """
  rows = num_rows(batch)
  if micro_batch_size < 1 or rows % micro_batch_size:
    raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the {rows} rows of "
                     "the batch")
  num_micro = rows // micro_batch_size
  return jax.tree.map(
      lambda x: x.reshape((micro_batch_size, num_micro) + x.shape[1:]).swapaxes(0, 1), batch)


def accumulate(fn: Callable[[Any, Any], Out], params: Any, batch: Any,
               micro_batch_size: int | None) -> Out:
  """sum_k fn(params, microbatch_k) over the `split` microbatches of `batch`.

  The sum runs in a `lax.scan`; floating leaves are summed in at least float32 (low-precision
  gradients would otherwise round every partial sum) and returned in fn's dtypes. With
  `micro_batch_size` None or the whole batch it is `fn(params, batch)`, with no scan.
  """
  if micro_batch_size is None or micro_batch_size == num_rows(batch):
    return fn(params, batch)
  micros = split(batch, micro_batch_size)
  shapes = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micros))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                       shapes)
  add = lambda total, micro: (jax.tree.map(jnp.add, total, fn(params, micro)), None)
  total, _ = jax.lax.scan(add, zeros, micros)
  return jax.tree.map(lambda t, s: t.astype(s.dtype), total, shapes)
