"""Tests for rlhf_jax.data.synthetic: determinism, labeler statistics, lexicon, tokenizer."""

import math

import numpy as np
import pytest
import transformers
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax import data
from rlhf_jax.data import synthetic

VADER = SentimentIntensityAnalyzer()
SMALL = dict(n_sft=300, n_pairs=300, n_prompts=300, n_eval_prompts=40)


def _compound(text):
  return VADER.polarity_scores(text)["compound"]


@pytest.fixture(scope="module")
def task():
  return data.make_default_task(seed=0, n_sft=2000, n_pairs=3000, n_prompts=500, n_eval_prompts=100)


def test_same_seed_same_task_other_seed_differs():
  a, b = data.make_default_task(seed=7, **SMALL), data.make_default_task(seed=7, **SMALL)
  assert a == b
  c = data.make_default_task(seed=8, **SMALL)
  assert a.sft != c.sft and a.preferences != c.preferences and a.eval_prompts != c.eval_prompts


def test_sizes_and_stream_independence():
  a = data.make_default_task(seed=1, **SMALL)
  sizes = (len(a.sft), len(a.preferences), len(a.train_prompts), len(a.eval_prompts))
  assert sizes == (300, 300, 300, 40)
  b = data.make_default_task(seed=1, **{**SMALL, "n_sft": 10})
  assert b.sft == a.sft[:10]
  assert b.preferences == a.preferences and b.train_prompts == a.train_prompts


def test_eval_prompts_disjoint_and_distinct(task):
  evals = set(task.eval_prompts)
  assert len(evals) == len(task.eval_prompts) == 100
  used = ({e.prompt for e in task.sft} | {p.prompt for p in task.preferences}
          | set(task.train_prompts))
  assert not evals & used
  assert {p.split()[0] for p in task.eval_prompts} == {"review", "diary", "note"}


def test_too_many_eval_prompts():
  with pytest.raises(ValueError, match="keep it <= half"):
    data.make_default_task(seed=0, n_sft=1, n_pairs=1, n_prompts=1, n_eval_prompts=1000)


def test_demonstrations_are_about_neutral(task):
  gold = np.array([data.gold_score(e.completion) for e in task.sft])
  assert abs(gold.mean()) < 0.1
  assert (gold > 0.3).mean() > 0.25 and (gold < -0.3).mean() > 0.25


def test_gold_score_orders_sentiment():
  ordered = ["very wonderful and the plot felt great !",
             "good .",
             "plain .",
             "not good .",
             "terrible and the acting felt awful !"]
  scores = [data.gold_score(t) for t in ordered]
  assert scores == sorted(scores, reverse=True)
  assert scores[0] > 0.8 and scores[2] == 0.0 and scores[-1] < -0.7
  for text in ordered:
    assert data.gold_score(text + " <eos> <pad> <pad>") == pytest.approx(_compound(text))


def test_gold_score_is_vader_on_every_templated_completion(task):
  texts = ([e.completion for e in task.sft] + [p.chosen for p in task.preferences]
           + [p.rejected for p in task.preferences])
  assert all(synthetic.grammatical(t) for t in texts)
  assert [data.gold_score(t) for t in texts] == [_compound(t) for t in texts]


@pytest.mark.parametrize("text", [
    "was was was splendid was splendid felt splendid",   # the collapse seen with KL off
    "splendid splendid splendid .",
    "very good . very good .",                            # two sentences
    "very good",                                          # no end
    "very very good .",                                   # one modifier at most
    "good and the plot felt great",
    "good and the coffee felt great .",                   # "coffee" is a thing, not an aspect
    "good <unk> .",
    "",
])
def test_gold_score_rejects_what_the_templates_cannot_write(text):
  assert not synthetic.grammatical(text)
  assert data.gold_score(text) == synthetic.UNGRAMMATICAL_SCORE == -1.0


def test_grammar_accepts_each_template_with_and_without_modifier():
  for text in ["very wonderful and the plot felt dull !", "dull because the coffee was red .",
               "not good , but the acting was great .", "slightly plain !", "  good   . "]:
    assert synthetic.grammatical(text), text
    assert data.gold_score(text) == _compound(" ".join(text.split()))


def test_lexicon_classes():
  lexicon = VADER.lexicon
  assert all(lexicon[w] >= 1.0 for w in synthetic.POSITIVE_WORDS)
  assert all(lexicon[w] <= -1.0 for w in synthetic.NEGATIVE_WORDS)
  sentiment_free = set(data.vocabulary()) - set(synthetic.POSITIVE_WORDS + synthetic.NEGATIVE_WORDS)
  assert not sentiment_free & set(lexicon)
  assert 300 <= len(data.vocabulary()) <= 1000


def test_prompts_carry_no_sentiment(task):
  assert all(_compound(p) == 0.0 for p in task.eval_prompts + task.train_prompts[:200])


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_label_pairs_follow_bradley_terry():
  # Fixed completions with a spread of margins, each labelled many times.
  base = ["good .", "plain .", "bad .", "very great !", "slightly nice .", "not awful ."]
  a = [x for x in base for y in base if x != y] * 200
  b = [y for x in base for y in base if x != y] * 200
  temperature = 0.3
  pairs = data.label_pairs(["p"] * len(a), a, b, np.random.default_rng(0), temperature)
  prob_a = np.array([_sigmoid((_compound(x) - _compound(y)) / temperature) for x, y in zip(a, b)])
  chose_a = np.array([p.chosen == x for p, x in zip(pairs, a)])
  assert all({p.chosen, p.rejected} == {x, y} for p, x, y in zip(pairs, a, b))
  sd = math.sqrt(np.sum(prob_a * (1 - prob_a))) / len(a)
  assert abs(chose_a.mean() - prob_a.mean()) < 4 * sd
  for x, y in [("good .", "bad ."), ("plain .", "slightly nice ."), ("good .", "plain .")]:
    sel = np.array([(u, v) == (x, y) for u, v in zip(a, b)])
    p = _sigmoid((_compound(x) - _compound(y)) / temperature)
    assert abs(chose_a[sel].mean() - p) < 4 * math.sqrt(p * (1 - p) / sel.sum()) + 1e-9


def test_task_label_noise_rate(task):
  # Flip rate of non-tied pairs must equal E[sigmoid(-|margin| / T)] at the default T = 0.1.
  chosen = np.array([_compound(p.chosen) for p in task.preferences])
  rejected = np.array([_compound(p.rejected) for p in task.preferences])
  untied = chosen != rejected
  p_flip = 1 / (1 + np.exp(np.abs(chosen - rejected)[untied] / 0.1))
  flipped = (chosen < rejected)[untied]
  sd = math.sqrt(np.sum(p_flip * (1 - p_flip))) / untied.sum()
  assert 0.02 < p_flip.mean() < 0.2
  assert abs(flipped.mean() - p_flip.mean()) < 4 * sd
  assert all(p.chosen != p.rejected for p in task.preferences)


def test_label_pairs_validation():
  with pytest.raises(ValueError, match="pair 0: completions are identical"):
    data.label_pairs(["p"], ["good ."], ["good ."], np.random.default_rng(0), 1.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    data.label_pairs(["p"], ["good ."], ["bad ."], np.random.default_rng(0), 0.0)


def test_tokenizer_round_trips_corpus(task, tmp_path):
  tok = data.build_tokenizer(data.vocabulary(), str(tmp_path))
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
  assert len(loaded) == len(data.vocabulary()) + 3
  corpus = ([e.prompt + " " + e.completion for e in task.sft] + task.eval_prompts
            + [p.prompt + " " + p.rejected for p in task.preferences[:300]])
  encoded = loaded(corpus, add_special_tokens=False)["input_ids"]
  assert encoded == tok(corpus, add_special_tokens=False)["input_ids"]
  assert not any(loaded.unk_token_id in ids for ids in encoded)
  assert [loaded.decode(ids) for ids in encoded] == corpus
  assert loaded.encode("the zebra", add_special_tokens=False)[1] == loaded.unk_token_id


def test_tokenizer_from_corpus_text(tmp_path):
  tok = data.build_tokenizer(["hello, world!", "world <eos>"], str(tmp_path))
  assert tok.convert_ids_to_tokens(list(range(len(tok)))) == [
      "<pad>", "<eos>", "<unk>", "!", ",", "hello", "world"]
  assert tok.encode("hello world<eos> <pad>", add_special_tokens=False) == [5, 6, 1, 0]


def test_written_task_reads_back_through_loaders(tmp_path):
  task = data.make_default_task(seed=2, **SMALL)
  files = data.write_default_task(task, str(tmp_path / "workdir"))
  assert data.load_sft(files.sft) == task.sft
  assert data.load_preferences(files.preferences) == task.preferences
  assert data.load_prompts(files.train_prompts) == task.train_prompts
  assert data.load_prompts(files.eval_prompts) == task.eval_prompts
