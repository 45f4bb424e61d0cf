"""Tests for rlhf_jax.data.iterator.PromptIterator."""

import numpy as np
import pytest

from rlhf_jax import data

N, P = 37, 5


def _arrays():
  # Row i holds the value i everywhere, so a batch's first column names its rows.
  ids = np.repeat(np.arange(N, dtype=np.int32)[:, None], P, axis=1)
  mask = (np.arange(P)[None, :] >= np.arange(N)[:, None] % P).astype(np.int32)
  return ids, mask


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_first_epoch_matches_reference_permutation():
  ids, mask = _arrays()
  it = data.PromptIterator(ids, mask, batch_size=8, seed=3)
  assert it.batches_per_epoch == 4 and it.local_batch_size == 8
  perm = np.random.default_rng([3, 0]).permutation(N)
  for b, (batch_ids, batch_mask, epoch) in enumerate(_take(it, 4)):
    rows = perm[b * 8:(b + 1) * 8]
    np.testing.assert_array_equal(batch_ids, ids[rows])
    np.testing.assert_array_equal(batch_mask, mask[rows])
    assert epoch == 0
  _, _, epoch = next(it)
  assert epoch == 1


def test_epoch_visits_distinct_rows_and_epochs_differ():
  ids, mask = _arrays()
  it = data.PromptIterator(ids, mask, batch_size=6, seed=0)
  epochs = [np.concatenate([b[0][:, 0] for b in _take(it, it.batches_per_epoch)]) for _ in range(3)]
  for order in epochs:
    assert len(order) == 36 and len(set(order.tolist())) == 36
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_hosts_shard_the_global_batch():
  ids, mask = _arrays()
  single = data.PromptIterator(ids, mask, batch_size=8, seed=1)
  hosts = [data.PromptIterator(ids, mask, batch_size=8, seed=1, process_index=p, process_count=2)
           for p in range(2)]
  assert hosts[0].local_batch_size == 4
  for _ in range(10):  # crosses two epoch boundaries
    g_ids, g_mask, g_epoch = next(single)
    (a_ids, a_mask, a_epoch), (b_ids, b_mask, b_epoch) = next(hosts[0]), next(hosts[1])
    assert not set(a_ids[:, 0]) & set(b_ids[:, 0])
    np.testing.assert_array_equal(np.concatenate([a_ids, b_ids]), g_ids)
    np.testing.assert_array_equal(np.concatenate([a_mask, b_mask]), g_mask)
    assert a_epoch == b_epoch == g_epoch


def test_resume_reproduces_sequence():
  ids, mask = _arrays()
  it = data.PromptIterator(ids, mask, batch_size=8, seed=5)
  _take(it, 3)
  state = it.state()
  assert state == {"epoch": 0, "position": 3}
  expected = _take(it, 6)
  resumed = data.PromptIterator(ids, mask, batch_size=8, seed=5)
  resumed.restore(dict(state))
  for (e_ids, e_mask, e_epoch), (r_ids, r_mask, r_epoch) in zip(expected, _take(resumed, 6)):
    np.testing.assert_array_equal(e_ids, r_ids)
    np.testing.assert_array_equal(e_mask, r_mask)
    assert e_epoch == r_epoch
  assert resumed.state() == it.state() == {"epoch": 2, "position": 1}


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 6, "process_count": 4}, "multiple of process_count"),
    ({"batch_size": 40}, "cannot fill one batch"),
    ({"batch_size": 8, "process_index": 2, "process_count": 2}, "process_index"),
])
def test_invalid_settings(kwargs, match):
  ids, mask = _arrays()
  with pytest.raises(ValueError, match=match):
    data.PromptIterator(ids, mask, seed=0, **kwargs)


def test_invalid_state():
  ids, mask = _arrays()
  it = data.PromptIterator(ids, mask, batch_size=8, seed=0)
  with pytest.raises(ValueError, match="invalid iterator state"):
    it.restore({"epoch": 0, "position": 4})
