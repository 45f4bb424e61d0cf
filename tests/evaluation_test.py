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


def test_completion_texts_drop_a_chat_templates_end_of_turn_marker(tmp_path):
  tok = data.build_tokenizer(WORDS, str(tmp_path / "tok"))
  tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
  good, end = tok.convert_tokens_to_ids(["good", "<|end|>"])
  ids = np.array([[good, end, tok.eos_token_id]])
  assert evaluation.completion_texts(tok, ids, np.ones_like(ids)) == ["good"]


def test_gold_scores_judge_each_text():
  got = evaluation.gold_scores(len, ["ab", "abcd", ""])
  assert got.dtype == np.float64 and got.tolist() == [2.0, 4.0, 0.0]


def test_load_gold_judge_imports_module_function():
  assert evaluation.load_gold_judge("rlhf_jax.data:gold_score") is data.gold_score
  for spec, match in [("rlhf_jax.data", "must be"), (":gold_score", "must be"),
                      ("rlhf_jax.data:nothing", "no callable"),
                      ("rlhf_jax.data.synthetic:PAD_TOKEN", "no callable")]:
    with pytest.raises(ValueError, match=match):
      evaluation.load_gold_judge(spec)


def test_eval_metrics_assembles_the_eval_record():
  raw, ref_raw = np.array([1.0, 2.0], np.float32), np.array([1.0, 0.0], np.float32)
  m = {"kl": np.float32(0.25), "response_length": np.float32(3.0), "eos_rate": np.float32(0.5)}
  rows, ref_rows = [[1, 2, 1], [3]], [[4, 4, 4]]
  want = {"eval_reward": 1.5, "eval_reward_se": 0.5, "eval_ref_reward": 0.5,
          "eval_ref_reward_se": 0.5, "eval_win_rate": 0.75, "eval_kl": 0.25,
          "eval_response_length": 3.0, "eval_eos_rate": 0.5, "eval_distinct_1": 3 / 4,
          "eval_distinct_2": 1.0, "eval_ref_distinct_2": 1 / 2}
  got = evaluation.eval_metrics(raw, ref_raw, m, rows, ref_rows)
  assert got == want and list(got) == list(want)
  assert all(type(v) is float for v in got.values())
  judged = evaluation.eval_metrics(raw, ref_raw, m, rows, ref_rows, gold=np.array([0.2, 0.6, 1.0]),
                                   ref_gold=np.array([0.25, 0.75]))
  # std with ddof=1 of (0.2, 0.6, 1.0) is 0.4; over sqrt(3).
  assert judged == pytest.approx({**want, "gold_score": 0.6, "gold_score_se": 0.4 / np.sqrt(3),
                                  "ref_gold_score": 0.5, "ref_gold_score_se": 0.25})
  single = evaluation.eval_metrics(raw, ref_raw, m, rows, ref_rows, np.array([0.5]),
                                   np.array([0.1]))
  assert single["gold_score_se"] == 0.0
  one = evaluation.eval_metrics(raw[:1], ref_raw[:1], m, rows, ref_rows)
  assert one["eval_reward_se"] == 0.0
  with pytest.raises(ValueError, match="together"):
    evaluation.eval_metrics(raw, ref_raw, m, rows, ref_rows, gold=np.array([0.5]))


def _eval(proxy, gold=None, se=0.01, kl=1.0, length=10.0, distinct=0.4, ref_distinct=0.4,
          proxy_se=0.05, ref=(0.0, -0.5)):
  """An evaluation record; the reference scored `ref` = (proxy, gold), with the same errors."""
  e = {"eval_reward": proxy, "eval_reward_se": proxy_se, "eval_ref_reward": ref[0],
       "eval_ref_reward_se": proxy_se, "eval_kl": kl, "eval_response_length": length,
       "eval_distinct_2": distinct, "eval_ref_distinct_2": ref_distinct}
  if gold is not None:
    e.update(gold_score=gold, gold_score_se=se, ref_gold_score=ref[1], ref_gold_score_se=se)
  return e


def _history(*pairs):
  return [_eval(r, g) for r, g in pairs]


def test_monitor_fires_when_gold_falls_from_its_best_and_the_proxy_holds():
  # Gold peaks at evaluation 2 (0.5, proxy 2.0), then falls by 0.3 > 3 * hypot(0.01, 0.01), the
  # proxy by 0.1 <= 3 * hypot(0.05, 0.05): within its noise.
  hist = _history((1.0, 0.3), (2.0, 0.5), (1.8, 0.45), (1.9, 0.2))
  before = copy.deepcopy(hist)
  verdict = evaluation.reward_hacking(hist)
  assert verdict.flag
  assert verdict.signals == pytest.approx({
      "hacking_kl_alarm": 0, "hacking_diversity_alarm": 0, "hacking_gold_drop": 0.3,
      "hacking_gold_margin": 3 * np.hypot(0.01, 0.01)})
  assert verdict.reason.startswith(
      "gold score 0.200, 0.300 below its best 0.500 (at evaluation 2 of 4; a drop of more than "
      "0.042 = 3 standard errors counts), reward-model score 1.900 held from 2.000 there (by "
      "0.212 at most); KL 0.10 nats/token")
  assert hist == before   # nothing added, nothing changed
  assert evaluation.reward_hacking(tuple(hist)).flag


def test_monitor_counts_the_reference_as_the_start():
  # Gamed before the first evaluation: gold never rose above the reference's 0.1.
  hist = [_eval(5.0, -1.0, ref=(0.5, 0.1)), _eval(5.5, -1.0, ref=(0.6, 0.0))]
  verdict = evaluation.reward_hacking(hist[:1])
  assert verdict.flag and "best 0.100 (the reference's" in verdict.reason
  assert verdict.signals["hacking_gold_drop"] == pytest.approx(1.1)
  assert evaluation.reward_hacking(hist).flag   # the first evaluation's reference stays the start
  # Worse than the reference on gold and on the proxy: a bad policy, not a hacked reward model.
  assert not evaluation.reward_hacking([_eval(0.0, -1.0, ref=(0.5, 0.1))]).flag


@pytest.mark.parametrize("hist", [
    _history((1.0, 0.3), (2.0, 0.4), (3.0, 0.5)),               # gold rises with the proxy
    _history((1.0, 0.3), (3.0, 0.5), (2.7, 0.2)),               # both fall: the proxy by > 0.212
    _history((1.0, 0.3), (2.0, 0.5), (2.5, 0.46)),              # a drop within 3 standard errors
    [_eval(1.0, 0.5, se=0.1), _eval(2.0, 0.1, se=0.1)],         # 0.4 < 3 * hypot(0.1, 0.1)
    _history((1.0, 0.5)),                                       # above the reference
    [_eval(r, kl=30.0) for r in (1.0, 2.0, 3.0)],                # no gold, KL alone
    [_eval(r, distinct=0.01) for r in (1.0, 2.0, 3.0)],          # no gold, diversity alone
    [],
])
def test_monitor_stays_quiet(hist):
  before = copy.deepcopy(hist)
  verdict = evaluation.reward_hacking(hist)
  assert not verdict.flag and verdict.reason
  assert hist == before


def test_monitor_falls_back_to_kl_and_distinct_n_without_a_gold_judge_and_says_so():
  hist = [_eval(1.0), _eval(5.0, kl=58.0, length=12.0, distinct=0.02, ref_distinct=0.37)]
  verdict = evaluation.reward_hacking(hist)
  assert verdict.flag
  assert verdict.signals == {"hacking_kl_alarm": 1, "hacking_diversity_alarm": 1}
  assert verdict.reason == ("no gold judge, so KL and distinct-n only: KL 4.83 nats/token (above "
                            "1), distinct-2 0.020 (below 0.5 x the reference's 0.370)")
  # The same signals with a gold judge that still rises only support, they do not fire.
  judged = [_eval(1.0, 0.1), _eval(5.0, 0.6, kl=58.0, length=12.0, distinct=0.02)]
  verdict = evaluation.reward_hacking(judged)
  assert not verdict.flag and verdict.signals["hacking_kl_alarm"] == 1
  # An evaluation without gold in the history means there is no judge to trust.
  assert "no gold judge" in evaluation.reward_hacking([_eval(1.0), _eval(2.0, 0.5)]).reason


def test_monitor_thresholds_are_parameters():
  hist = [_eval(1.0, 0.5, se=0.1), _eval(2.0, 0.1, se=0.1, kl=5.0)]
  assert not evaluation.reward_hacking(hist).flag
  assert evaluation.reward_hacking(hist, gold_z=2.0).flag           # 0.4 > 2 * 0.141
  assert evaluation.reward_hacking(hist, max_kl_per_token=0.4).signals["hacking_kl_alarm"] == 1
  for bad in ({"gold_z": 0.0}, {"max_kl_per_token": -1.0}, {"min_distinct_ratio": 1.0}):
    with pytest.raises(ValueError, match="monitor needs"):
      evaluation.reward_hacking(hist, **bad)


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
