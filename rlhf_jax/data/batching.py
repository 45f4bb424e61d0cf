"""Length-aware batching of right-padded rows: a few fixed widths and per-epoch batch plans.

Supervised rows are stored [N, max_len] and right padded, but a batch only needs the width of its
longest row; trimmed to one of a few fixed widths, its compute falls with its padding while the
jitted step compiles at most once per width (bucketing by sequence length: Khomenko et al. 2016,
"Accelerating recurrent neural network training using sequence bucketing and multi-GPU data
parallelization"; Doetsch et al. 2017). Pure NumPy: the plan of a run is a deterministic sequence
of `Step(epoch, rows, width)`, so a resumed run can skip its first k steps.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import chex
import numpy as np

# Widths are multiples of this (vector-unit friendly on CPU/GPU, sublane-aligned on TPU), or the
# arrays' full width when that is smaller.
WIDTH_MULTIPLE = 8
# The stream of the config seed that the per-epoch shuffles draw from (the train/eval split of
# trainers.supervised draws stream 0).
SHUFFLE_STREAM = 1


class Step(NamedTuple):
  """One optimizer step of a plan: its epoch, the row indices [batch_size] of its batch and the
  width its arrays are trimmed to."""
  epoch: int
  rows: np.ndarray
  width: int


def _mask_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
  keys = [k for k, v in arrays.items() if k.endswith("mask") and v.ndim == 2]
  if not keys:
    raise ValueError(f"no [N, L] '*mask' array among {sorted(arrays)}")
  return keys


def full_width(arrays: Mapping[str, np.ndarray]) -> int:
  """L, the shared width of the "*mask" arrays [N, L] of `arrays`."""
  widths = {arrays[k].shape[1] for k in _mask_keys(arrays)}
  if len(widths) != 1:
    raise ValueError(f"the '*mask' arrays have different widths {sorted(widths)}")
  return widths.pop()


def row_lengths(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """int [N]: 1 + the last column where any "*mask" array of the row is non-zero (0 for an
  all-padding row); for a preference pair the longer of its two sides."""
  keys = _mask_keys(arrays)
  length = np.zeros(arrays[keys[0]].shape[0], np.int64)
  for key in keys:
    nonzero = arrays[key] != 0
    last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    length = np.maximum(length, np.where(nonzero.any(axis=1), last, 0))
  return length


def bucket_widths(lengths: np.ndarray, num_widths: int, max_width: int) -> tuple[int, ...]:
  """At most `num_widths` increasing widths covering every length, with the least padding.

  The candidates are the lengths rounded up to a multiple of WIDTH_MULTIPLE (capped at
  `max_width`); a row is padded to the smallest chosen width w(l) >= l, and the widths minimise
  the padded slots sum_rows (w(l) - l) by the exact dynamic programme of 1-D k-segmentation
  (the V-optimal histogram of Jagadish et al. 1998 with a linear cost):
    D_j(c) = min_{c' < c} D_{j-1}(c') + sum_{c' < l <= c} (c - l).
  `num_widths` = 1 gives (max_width,): every row padded to the full width, as without bucketing.
  """
  if num_widths < 1:
    raise ValueError(f"num_widths must be >= 1, got {num_widths}")
  lengths = np.asarray(lengths, np.int64)
  chex.assert_rank(lengths, 1)
  if lengths.size and int(lengths.max()) > max_width:
    raise ValueError(f"a row of {int(lengths.max())} tokens exceeds max_width={max_width}")
  if num_widths == 1 or not lengths.size:
    return (max_width,)
  rounded = np.minimum(-(-np.maximum(lengths, 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, max_width)
  cand, inverse = np.unique(rounded, return_inverse=True)
  count = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=cand.size))])
  total = np.concatenate([[0], np.cumsum(np.bincount(inverse, weights=lengths,
                                                     minlength=cand.size))])
  m = cand.size
  # cost[i, j]: rows of candidates i..j-1 padded to cand[j-1] (inf unless i < j).
  i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
  cost = np.where(i < j, cand[np.maximum(j - 1, 0)] * (count[j] - count[i])
                  - (total[j] - total[i]), np.inf)
  # D_j over the first c candidates, exactly j widths (a split never adds padding, so with
  # m >= j candidates exactly j is as good as at most j).
  best = np.where(np.arange(m + 1) == 0, 0.0, np.inf)
  starts = []
  for _ in range(min(num_widths, m)):
    paths = best[:, None] + cost
    starts.append(np.argmin(paths, axis=0))
    best = paths.min(axis=0)
  widths, end = [], m
  for start in reversed(starts):
    widths.append(int(cand[end - 1]))
    end = int(start[end])
  return tuple(sorted(widths))


def width_of(lengths: np.ndarray, widths: Sequence[int]) -> int:
  """The smallest of `widths` (increasing) that holds every length."""
  longest = int(np.max(lengths, initial=0))
  k = int(np.searchsorted(widths, longest))
  if k == len(widths):
    raise ValueError(f"a row of {longest} tokens is longer than the widest width {widths[-1]}")
  return int(widths[k])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """Row indices [n // batch_size, batch_size] of one epoch: a permutation of range(n) drawn from
  (seed, epoch), the last incomplete batch dropped."""
  perm = np.random.default_rng([seed, SHUFFLE_STREAM, epoch]).permutation(n)
  steps = n // batch_size
  return perm[:steps * batch_size].reshape(steps, batch_size)


def epoch_plan(lengths: np.ndarray, batch_size: int, widths: Sequence[int], seed: int,
               epoch: int, group_by_length: bool) -> list[Step]:
  """The steps of one epoch, each batch trimmed to the smallest width holding its longest row.

  The rows kept are those of `epoch_batches` (the same permutation of (seed, epoch), the same
  n mod batch_size dropped). Without `group_by_length` the batches are exactly its batches. With
  it, the kept rows are stably sorted by their width (so they stay in random order within a width)
  and cut into consecutive batches, whose order is then shuffled (from (seed, epoch, 1)): all but at
  most len(widths) - 1 batches (those straddling two widths) hold rows of one width only.
  """
  lengths = np.asarray(lengths)
  chex.assert_rank(lengths, 1)
  batches = epoch_batches(lengths.shape[0], batch_size, seed, epoch)
  if group_by_length and len(widths) > 1:
    kept = batches.ravel()
    kept = kept[np.argsort(np.searchsorted(widths, lengths[kept]), kind="stable")]
    order = np.random.default_rng([seed, SHUFFLE_STREAM, epoch, 1]).permutation(len(batches))
    batches = kept.reshape(batches.shape)[order]
  return [Step(epoch, rows, width_of(lengths[rows], widths)) for rows in batches]


def plan(lengths: np.ndarray, batch_size: int, widths: Sequence[int], seed: int, epochs: int,
         group_by_length: bool) -> Iterator[Step]:
  """Every step of `epochs` epochs of `epoch_plan`, in order (step k is the k-th yielded)."""
  for epoch in range(epochs):
    yield from epoch_plan(lengths, batch_size, widths, seed, epoch, group_by_length)


def trim(arrays: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """`arrays` with every [N, L, ...] array (L: the "*mask" arrays' width) cut to its first
  `width` columns; the others whole. Lossless when `width` >= `row_lengths` of every row."""
  full = full_width(arrays)
  return {k: v[:, :width] if v.ndim >= 2 and v.shape[1] == full else v
          for k, v in arrays.items()}


def token_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(real tokens, slots) of the "*attention_mask" arrays of `batch`: their non-zero entries and
  their sizes; 1 - real / slots is the batch's padding fraction."""
  masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
  return sum(int(np.count_nonzero(m)) for m in masks), sum(int(m.size) for m in masks)
