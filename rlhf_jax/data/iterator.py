"""Deterministic, resumable, host-sharded iteration over encoded prompts."""

from typing import Any

import chex
import numpy as np


class PromptIterator:
  """Endless iterator of prompt batches, reshuffled every epoch.

  Epoch e visits the rows in the order `np.random.default_rng([seed, e])
  .permutation(N)`, cut into `N // batch_size` global batches (the remainder is
  dropped, so every batch has the same shape and no row repeats in an epoch).
  `batch_size` is the GLOBAL batch: process p of `process_count` receives the
  contiguous slice [p * b, (p + 1) * b) of each global batch, b = batch_size //
  process_count, which is the layout `jax.make_array_from_process_local_data`
  expects for a batch axis sharded across processes. Every process must build
  the iterator from the same ids, mask, batch_size and seed.

  `next(it)` returns (ids [b, P], mask [b, P], epoch). `state()` / `restore()`
  save and set the position for exact resumption.
  """

  def __init__(self, ids: np.ndarray, mask: np.ndarray, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    chex.assert_rank([ids, mask], 2)
    chex.assert_equal_shape([ids, mask])
    chex.assert_type(ids, int)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                       f"{process_count}")
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                       f"process_count {process_count}")
    if ids.shape[0] < batch_size:
      raise ValueError(f"{ids.shape[0]} prompts cannot fill one batch of {batch_size}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self._ids = ids
    self._mask = mask
    self._batch_size = batch_size
    self._seed = seed
    self._local_batch_size = batch_size // process_count
    self._offset = process_index * self._local_batch_size
    self._batches_per_epoch = ids.shape[0] // batch_size
    self._epoch = 0
    self._position = 0
    self._order = self._permutation(0)

  @property
  def batches_per_epoch(self) -> int:
    return self._batches_per_epoch

  @property
  def local_batch_size(self) -> int:
    return self._local_batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._ids.shape[0])

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray, int]:
    start = self._position * self._batch_size + self._offset
    rows = self._order[start:start + self._local_batch_size]
    epoch = self._epoch
    self._position += 1
    if self._position == self._batches_per_epoch:
      self._epoch += 1
      self._position = 0
      self._order = self._permutation(self._epoch)
    return self._ids[rows], self._mask[rows], epoch

  def state(self) -> dict[str, int]:
    """The position of the next batch: {"epoch": e, "position": batch index within e}."""
    return {"epoch": self._epoch, "position": self._position}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a `state()` taken from an iterator with the same data and settings."""
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self._batches_per_epoch:
      raise ValueError(f"invalid iterator state {state} for {self._batches_per_epoch} "
                       "batches per epoch")
    self._epoch, self._position = epoch, position
    self._order = self._permutation(epoch)
