"""Tests for rlhf_jax.evaluation against hand counts and hand-written tables."""

import copy

import numpy as np
import pytest

from rlhf_jax import data, evaluation

WORDS = "good bad fine great".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(WORDS, str(tmp_path_factory.mktemp("tok")))


def test_valid_rows_keep_masked_tokens_in_order():
  ids = np.array([[0, 0, 7, 8], [5, 6, 9, 0]])
  mask = np.array([[0, 0, 1, 1], [1, 1, 1, 0]])
  assert evaluation.valid_rows(ids, mask) == [[7, 8], [5, 6, 9]]
  with pytest.raises(ValueError, match="same shape"):
    evaluation.valid_rows(ids, mask[:, :3])


def test_distinct_n_matches_a_hand_count():
  rows = [[1, 2, 1, 2], [1, 2, 3]]
  # unigrams 1 2 1 2 1 2 3: 3 distinct of 7; bigrams 12 21 12 12 23: 3 distinct of 5;
  # 4-grams: only 1212 (the second row is too short).
  assert evaluation.distinct_n(rows, 1) == 3 / 7
  assert evaluation.distinct_n(rows, 2) == 3 / 5
  assert evaluation.distinct_n(rows, 4) == 1.0
  assert evaluation.distinct_n([[1], []], 2) == 0.0
  with pytest.raises(ValueError, match="n >= 1"):
    evaluation.distinct_n(rows, 0)


def test_win_rate_counts_ties_half():
  scores = np.array([3.0, 1.0, 2.0, 2.0])
  ref = np.array([1.0, 3.0, 2.0, 5.0])   # win, loss, tie, loss
  assert evaluation.win_rate(scores, ref) == 1.5 / 4
  assert evaluation.win_rate(ref, ref) == 0.5
  with pytest.raises(ValueError, match="same shape"):
    evaluation.win_rate(scores, ref[:3])


def test_completion_texts_strip_eos_and_padding(tokenizer):
  good, bad, fine, great = (tokenizer.convert_tokens_to_ids(w) for w in WORDS)
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  ids = np.array([[good, bad, eos, pad], [fine, eos, great, pad], [great, good, fine, bad]])
  # Row 1's "great" after EOS is masked out: the mask decides, not the pad id.
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  assert evaluation.completion_texts(tokenizer, ids, mask) == [
      "good bad", "fine", "great good fine bad"]


def test_gold_score_is_the_mean_judgement():
  assert evaluation.gold_score(len, ["ab", "abcd", ""]) == 2.0


def test_eval_metrics_assembles_the_eval_record():
  raw, ref_raw = np.array([1.0, 2.0], np.float32), np.array([1.0, 0.0], np.float32)
  m = {"kl": np.float32(0.25), "response_length": np.float32(3.0), "eos_rate": np.float32(0.5)}
  rows = [[1, 2, 1], [3]]
  want = {"eval_reward": 1.5, "eval_ref_reward": 0.5, "eval_win_rate": 0.75, "eval_kl": 0.25,
          "eval_response_length": 3.0, "eval_eos_rate": 0.5, "eval_distinct_1": 3 / 4,
          "eval_distinct_2": 1.0}
  got = evaluation.eval_metrics(raw, ref_raw, m, rows)
  assert got == want and list(got) == list(want)
  assert all(type(v) is float for v in got.values())
  judged = evaluation.eval_metrics(raw, ref_raw, m, rows, gold=0.5, ref_gold=0.25)
  assert judged == {**want, "gold_score": 0.5, "ref_gold_score": 0.25}
  with pytest.raises(ValueError, match="together"):
    evaluation.eval_metrics(raw, ref_raw, m, rows, gold=0.5)


def _history(*pairs):
  return [{"eval_reward": r, "gold_score": g, "eval_kl": 0.0} for r, g in pairs]


def test_monitor_fires_when_proxy_rises_and_gold_falls():
  # Only the last three evaluations count: the first one breaks both trends.
  hist = _history((9.0, 0.0), (1.0, 0.5), (2.0, 0.4), (3.0, 0.3))
  before = copy.deepcopy(hist)
  verdict = evaluation.reward_hacking(hist)
  assert verdict.flag
  assert verdict.reason == ("reward-model score rose 1.000 -> 3.000 while the gold score fell "
                            "0.500 -> 0.300 over the last 3 evaluations")
  assert hist == before   # nothing added, nothing changed
  assert evaluation.reward_hacking(tuple(hist)).flag


@pytest.mark.parametrize("hist", [
    _history((1.0, 0.3), (2.0, 0.4), (3.0, 0.5)),   # gold rises with the proxy
    _history((1.0, 0.5), (1.0, 0.4), (3.0, 0.3)),   # proxy flat once: not strictly rising
    _history((1.0, 0.5), (2.0, 0.5), (3.0, 0.3)),   # gold flat once: not strictly falling
    _history((3.0, 0.5), (2.0, 0.4), (1.0, 0.3)),   # both fall
    _history((1.0, 0.5), (2.0, 0.4)),                # too short
    [{"eval_reward": r} for r in (1.0, 2.0, 3.0)],   # no gold
    [],
])
def test_monitor_stays_quiet(hist):
  before = copy.deepcopy(hist)
  verdict = evaluation.reward_hacking(hist)
  assert not verdict.flag and verdict.reason
  assert hist == before


def test_monitor_window_is_a_parameter():
  hist = _history((3.0, 0.1), (1.0, 0.5), (2.0, 0.4))
  assert not evaluation.reward_hacking(hist, window=3).flag
  assert evaluation.reward_hacking(hist, window=2).flag
  assert "2 of the 4" in evaluation.reward_hacking(hist[:2], window=4).reason
  with pytest.raises(ValueError, match="window"):
    evaluation.reward_hacking(hist, window=1)


def test_sample_rows_and_samples_table():
  rows = evaluation.sample_rows(["p one", "p two", "p three"], ["c one", "c two", "c three"],
                                np.array([1.23456, -0.5, 2.0], np.float32), limit=2)
  assert rows == [{"prompt": "p one", "completion": "c one", "reward": float(np.float32(1.23456))},
                  {"prompt": "p two", "completion": "c two", "reward": -0.5}]
  assert all(type(r["reward"]) is float for r in rows)
  assert evaluation.samples_table(rows) == (
      "| prompt | completion | reward |\n"
      "| --- | --- | --- |\n"
      "| p one | c one | 1.235 |\n"
      "| p two | c two | -0.500 |")
  assert evaluation.samples_table([]) == "| prompt | completion | reward |\n| --- | --- | --- |"
