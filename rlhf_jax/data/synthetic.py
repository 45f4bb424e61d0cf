"""The default task: an offline sentiment-steering task with a simulated labeler.

The setting of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences", positive-sentiment continuation), shrunk so a 1-5M parameter
model learns it on two CPU cores in minutes:

  - Text: short English review / diary sentences generated from four templates
    and word lists (~380 words). Adjectives come from the VADER lexicon
    (Hutto & Gilbert 2014): positive (valence >= 1), negative (<= -1), and
    neutral ones absent from it; nouns and template words are all absent too,
    so only adjectives, modifiers ("very", "not", ...) and "!" carry sentiment.
  - Prompts are sentence openings ("review : the film at the museum was");
    completions finish the sentence ("very charming and the plot felt dull .").
    Each adjective slot draws its class uniformly from {positive, negative,
    neutral}, so demonstrations (and the SFT policy) are about neutral on average.
  - Gold reward: `gold_score`, what a person reading the completion would give:
    its VADER compound score in [-1, 1] when the templates' grammar accepts it
    (`grammatical`), the lowest score, -1, when it does not. A policy aligned to
    the labeler writes well-formed sentences with positive words; one that games
    the reward model with positive words strung together scores -1.
  - Simulated human: `label_pairs` prefers completion a over b with probability
    sigmoid((gold(a) - gold(b)) / temperature), i.e. Bradley-Terry (Bradley &
    Terry 1952) with a temperature; the reward model has to undo this noise.

Everything is a pure function of the seed. The pipeline writes the task to
JSONL with `write_default_task` and reads it back through `loaders`, so the
default run exercises the same path as user data.
"""

import dataclasses
import functools
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from rlhf_jax.data.loaders import PreferencePair
from rlhf_jax.data.loaders import SFTExample
from rlhf_jax.data.loaders import write_jsonl
from rlhf_jax.data.tokenize import import_transformers

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2

POSITIVE_WORDS = tuple("""
good great excellent wonderful amazing lovely beautiful brilliant charming cheerful delightful
enjoyable fantastic fun funny glad gorgeous graceful happy harmonious helpful honest hopeful
impressive inspiring joyful kind lively lucky magnificent marvelous nice outstanding peaceful
perfect pleasant pleased powerful precious pretty proud relaxed remarkable rich romantic safe
satisfying sincere smart splendid stunning successful superb sweet terrific thoughtful thrilling
useful wise worthy fresh friendly generous gentle calm clever comfortable confident cool creative
elegant exciting fabulous fair faithful fascinating awesome bright brave adorable admirable
affectionate amusing beloved blissful classy
""".split())
NEGATIVE_WORDS = tuple("""
bad terrible awful horrible dreadful boring dull sad angry annoying ugly poor weak disappointing
disgusting dirty painful pathetic miserable nasty stupid tragic lousy grim hostile lonely messy
rude sick tense tired upset useless worthless wrong unhappy unpleasant unfair foolish frustrating
harsh hateful hurtful ignorant irritating lame mad nervous offensive bitter broken careless
confused cruel dangerous depressing desperate disastrous dumb evil fake fearful gross guilty
hopeless inferior insane jealous ridiculous scary selfish stressful
""".split())
NEUTRAL_WORDS = tuple("""
long short new old large small quiet loud simple plain normal usual typical regular average
ordinary modern ancient square round red blue green yellow brown wooden metal tall thin wide
narrow heavy light early late busy distant local public private formal central general basic
similar different familiar unusual rare common medium
""".split())
# VADER boosters, dampeners and a negation: they scale or flip the next adjective.
MODIFIER_WORDS = ("very", "really", "so", "quite", "extremely", "slightly", "somewhat", "not")

_SLOT_WORDS = {
    "{subject}": tuple("""movie film show book album concert game cartoon memoir series episode
        song documentary podcast sequel musical opera lecture exhibition comic""".split()),
    "{place}": tuple("""park museum station library market cafe office school garden kitchen
        beach harbor village hotel theater stadium airport bakery gym studio bridge river farm
        street restaurant""".split()),
    "{person}": tuple("""nephew sister brother mother father teacher neighbor cousin boss colleague
        uncle aunt roommate coach grandmother""".split()),
    "{thing}": tuple("""coffee bread soup room chair window lamp sofa bed jacket shirt bicycle car
        train bus phone laptop camera clock view weather music food service staff table door
        wall floor light menu ticket painting photo map schedule tea cake salad pizza
        water""".split()),
    "{aspect}": tuple("""plot acting ending music dialogue pacing story soundtrack cast script
        scenery lighting costumes camera editing animation atmosphere design characters setting
        sound writing direction visuals finale""".split()),
    "{time}": tuple("morning evening afternoon weekend week night month year".split()),
}

# (prompt, completion) templates; "{...}" tokens are slots.
_TEMPLATES = (
    ("review : the {subject} at the {place} was",
     "{mod} {adj} and the {aspect} felt {adj} {end}"),
    ("diary : this {time} at the {place} i felt",
     "{mod} {adj} because the {thing} was {adj} {end}"),
    ("review : my {person} thought the {subject} was",
     "{mod} {adj} , but the {aspect} was {adj} {end}"),
    ("note : the {thing} in the {place} looked",
     "{mod} {adj} {end}"),
)
_END_WORDS = (".", "!")   # what "{end}" draws
_MODIFIER_PROB = 0.5
_EXCLAMATION_PROB = 0.25

# Independent random streams, so e.g. changing n_sft leaves the pairs unchanged.
_SPLIT_STREAM, _SFT_STREAM, _PAIR_STREAM, _LABEL_STREAM, _PROMPT_STREAM = range(5)


@dataclasses.dataclass(frozen=True)
class DefaultTask:
  """The default task's data.

  Attributes:
    sft: demonstrations.
    preferences: labelled pairs (completions only in chosen/rejected).
    train_prompts: RL prompts.
    eval_prompts: distinct held-out prompts, disjoint from all prompts above.
  """
  sft: list[SFTExample]
  preferences: list[PreferencePair]
  train_prompts: list[str]
  eval_prompts: list[str]


class DefaultTaskFiles(NamedTuple):
  """Paths written by `write_default_task`.

  Read back with `load_sft`, `load_preferences` and `load_prompts`.
  """
  sft: str
  preferences: str
  train_prompts: str
  eval_prompts: str


def vocabulary() -> list[str]:
  """Every word the templates can produce, sorted (special tokens excluded)."""
  words = set(POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS + MODIFIER_WORDS + _END_WORDS)
  for slot_words in _SLOT_WORDS.values():
    words.update(slot_words)
  for template in itertools.chain.from_iterable(_TEMPLATES):
    words.update(w for w in template.split() if not w.startswith("{"))
  return sorted(words)


def build_tokenizer(words_or_corpus: Iterable[str], out_dir: str) -> Any:
  """Builds, saves and returns a word-level tokenizer over the words of `words_or_corpus`.

  Each string is split by the `tokenizers` Whitespace pre-tokenizer (runs of
  word characters or of punctuation), the distinct pieces sorted and numbered
  after "<pad>" = 0, "<eos>" = 1, "<unk>" = 2. The result is a
  `transformers.PreTrainedTokenizerFast` with pad/eos/unk set, saved with
  `save_pretrained(out_dir)` so `AutoTokenizer.from_pretrained(out_dir)` loads
  it offline. Special-token strings in the corpus are not split into words.
  Decoding joins tokens with single spaces, so space-separated text (like the
  synthetic corpus) round-trips exactly.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  transformers = import_transformers()
  pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  words = set()
  for text in words_or_corpus:
    # Special tokens are matched whole before pre-tokenisation, so "<eos>" in
    # the corpus must not add "<", "eos" and ">" to the vocabulary.
    for special in SPECIAL_TOKENS:
      text = text.replace(special, " ")
    words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
  ordered = list(SPECIAL_TOKENS) + sorted(words)
  model = tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(ordered)},
                                      unk_token=UNK_TOKEN)
  backend = tokenizers.Tokenizer(model)
  backend.pre_tokenizer = pre_tokenizer
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN)
  tokenizer.save_pretrained(out_dir)
  return tokenizer


@functools.cache
def _vader() -> Any:
  from vaderSentiment import vaderSentiment  # pylint: disable=g-import-not-at-top
  return vaderSentiment.SentimentIntensityAnalyzer()


@functools.cache
def _grammar() -> re.Pattern[str]:
  """The completions the templates can produce, as one regular expression over their words,
  each followed by a space: "{adj}" any positive, negative or neutral adjective, "{mod}" one
  modifier or none, "{end}" "." or "!", "{aspect}" / "{thing}" their slot words, every other
  template word itself."""
  def one_of(words: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words)) + ") "
  slots = {"{adj}": one_of(POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS),
           "{mod}": "(?:" + one_of(MODIFIER_WORDS) + ")?",
           "{end}": one_of(_END_WORDS),
           "{aspect}": one_of(_SLOT_WORDS["{aspect}"]),
           "{thing}": one_of(_SLOT_WORDS["{thing}"])}
  return re.compile("|".join(
      "".join(slots.get(token, re.escape(token) + " ") for token in template.split())
      for _, template in _TEMPLATES))


def grammatical(text: str) -> bool:
  """Whether `text` (words separated by whitespace) is a completion the templates can produce.

  A person reading the default task's completions would reject anything else: word salad,
  repeated phrases, two sentences, a sentence without its end or with unknown words. The grammar
  admits one sentence of at most two adjective slots, so it needs no separate repetition rule.
  """
  return _grammar().fullmatch(" ".join(text.split()) + " ") is not None


UNGRAMMATICAL_SCORE = -1.0


def gold_score(text: str) -> float:
  """The simulated human's utility of a completion, in [-1, 1]:

    gold(text) = VADER compound(text)  if `grammatical(text)`,
                 -1 (`UNGRAMMATICAL_SCORE`, the worst review)  otherwise.

  compound = x / sqrt(x^2 + 15), x the sum of rule-adjusted word valences
  (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment
  Analysis of Social Media Text"). VADER alone rates words, not sentences: "was
  splendid was splendid felt splendid" scores 0.91, as much as a glowing review, so
  a policy that strings positive words together would look aligned to it. Every completion
  of the templates (all demonstrations and all preference pairs) gets exactly its
  VADER score. "<eos>" and "<pad>" are removed first, so decoded generations can be
  scored as they are; "<unk>" is a word no template produces.
  """
  words = " ".join(w for w in text.split() if w not in (EOS_TOKEN, PAD_TOKEN))
  if not grammatical(words):
    return UNGRAMMATICAL_SCORE
  return float(_vader().polarity_scores(words)["compound"])


def label_pairs(prompts: Sequence[str], completions_a: Sequence[str],
                completions_b: Sequence[str], rng: np.random.Generator,
                temperature: float) -> list[PreferencePair]:
  """Simulated noisy human labels for pairs of completions of the same prompt.

  Bradley-Terry model with temperature T (Bradley & Terry 1952; as the reward
  model assumes, Christiano et al. 2017): a is chosen with probability
    P(a > b) = sigmoid((gold_score(a) - gold_score(b)) / T).
  Small T gives near-perfect labels, large T near coin flips; equal scores are
  a coin flip. One uniform draw per pair from `rng`. The task's pairs are all
  templated, so their labels depend on VADER's score alone.

  Raises:
    ValueError: mismatched lengths, T <= 0, or a pair with identical completions.
  """
  if not len(prompts) == len(completions_a) == len(completions_b):
    raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(completions_a)} a, "
                     f"{len(completions_b)} b")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  for i, (a, b) in enumerate(zip(completions_a, completions_b)):
    if a == b:
      raise ValueError(f"pair {i}: completions are identical ({a!r})")
  margin = np.array([gold_score(a) - gold_score(b)
                     for a, b in zip(completions_a, completions_b)], np.float64)
  prob_a = 1.0 / (1.0 + np.exp(-margin / temperature))
  a_chosen = rng.random(len(prompts)) < prob_a
  return [PreferencePair(p, a, b) if pick_a else PreferencePair(p, b, a)
          for p, a, b, pick_a in zip(prompts, completions_a, completions_b, a_chosen)]


def _prompts_of(template: str) -> list[str]:
  """All fillings of a prompt template, in a fixed order."""
  tokens = template.split()
  choices = [_SLOT_WORDS[t] if t.startswith("{") else (t,) for t in tokens]
  return [" ".join(words) for words in itertools.product(*choices)]


def _uniform(words: Sequence[str]) -> Callable[[np.random.Generator], str]:
  return lambda rng: words[rng.integers(len(words))]


def _sample_adjective(rng: np.random.Generator) -> str:
  return _uniform((POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS)[rng.integers(3)])(rng)


def _sample_modifier(rng: np.random.Generator) -> str:
  if rng.random() >= _MODIFIER_PROB:
    return ""
  return _uniform(MODIFIER_WORDS)(rng)


_COMPLETION_SLOTS: dict[str, Callable[[np.random.Generator], str]] = {
    "{adj}": _sample_adjective,
    "{mod}": _sample_modifier,
    "{end}": lambda rng: "!" if rng.random() < _EXCLAMATION_PROB else ".",
    "{aspect}": _uniform(_SLOT_WORDS["{aspect}"]),
    "{thing}": _uniform(_SLOT_WORDS["{thing}"]),
}


def _sample_completion(template: str, rng: np.random.Generator) -> str:
  words = [_COMPLETION_SLOTS[t](rng) if t.startswith("{") else t for t in template.split()]
  return " ".join(w for w in words if w)


def _split_prompts(seed: int, n_eval: int) -> tuple[list[list[str]], list[str]]:
  """Holds out n_eval prompts spread evenly over templates.

  Returns:
    (train prompt pool of each template, shuffled held-out prompts).
  """
  rng = np.random.default_rng([seed, _SPLIT_STREAM])
  train_pools, eval_prompts = [], []
  for t, (prompt_template, _) in enumerate(_TEMPLATES):
    prompts = _prompts_of(prompt_template)
    held_out = n_eval // len(_TEMPLATES) + (t < n_eval % len(_TEMPLATES))
    if held_out > len(prompts) // 2:
      raise ValueError(f"n_eval_prompts={n_eval} would hold out {held_out} of the "
                       f"{len(prompts)} prompts of template {prompt_template!r}; keep it <= half")
    order = rng.permutation(len(prompts))
    eval_prompts.extend(prompts[i] for i in order[:held_out])
    train_pools.append([prompts[i] for i in order[held_out:]])
  return train_pools, [eval_prompts[i] for i in rng.permutation(len(eval_prompts))]


def _sample_prompt(train_pools: list[list[str]], rng: np.random.Generator) -> tuple[int, str]:
  """A training prompt: template uniform, then a prompt uniform in its pool."""
  t = int(rng.integers(len(train_pools)))
  return t, train_pools[t][rng.integers(len(train_pools[t]))]


def make_default_task(seed: int = 0, n_sft: int = 4096, n_pairs: int = 4096,
                      n_prompts: int = 4096, n_eval_prompts: int = 256,
                      label_temperature: float = 0.1) -> DefaultTask:
  """Generates the default task deterministically from `seed`.

  Args:
    seed: non-negative seed; equal seeds give equal tasks.
    n_sft: demonstrations, completions sampled from the templates' distribution.
    n_pairs: preference pairs; two distinct completions of one prompt, both from
      the demonstration distribution (as from the SFT policy), labelled by
      `label_pairs` at `label_temperature`.
    n_prompts: RL training prompts (drawn with replacement from the train pool).
    n_eval_prompts: distinct held-out prompts, never used for SFT, pairs or RL.
    label_temperature: Bradley-Terry temperature of the simulated labeler.

  Returns:
    A `DefaultTask`.
  """
  train_pools, eval_prompts = _split_prompts(seed, n_eval_prompts)

  rng = np.random.default_rng([seed, _SFT_STREAM])
  sft = []
  for _ in range(n_sft):
    t, prompt = _sample_prompt(train_pools, rng)
    sft.append(SFTExample(prompt, _sample_completion(_TEMPLATES[t][1], rng)))

  rng = np.random.default_rng([seed, _PAIR_STREAM])
  pair_prompts, completions_a, completions_b = [], [], []
  for _ in range(n_pairs):
    t, prompt = _sample_prompt(train_pools, rng)
    a = _sample_completion(_TEMPLATES[t][1], rng)
    b = _sample_completion(_TEMPLATES[t][1], rng)
    while b == a:
      b = _sample_completion(_TEMPLATES[t][1], rng)
    pair_prompts.append(prompt)
    completions_a.append(a)
    completions_b.append(b)
  preferences = label_pairs(pair_prompts, completions_a, completions_b,
                            np.random.default_rng([seed, _LABEL_STREAM]), label_temperature)

  rng = np.random.default_rng([seed, _PROMPT_STREAM])
  train_prompts = [_sample_prompt(train_pools, rng)[1] for _ in range(n_prompts)]
  return DefaultTask(sft, preferences, train_prompts, eval_prompts)


def write_default_task(task: DefaultTask, out_dir: str) -> DefaultTaskFiles:
  """Writes the task as JSONL: sft.jsonl {prompt, completion}, preferences.jsonl
  {prompt, chosen, rejected}, train_prompts.jsonl and eval_prompts.jsonl {prompt}."""
  def path(name: str) -> str:
    return os.path.join(out_dir, name)
  return DefaultTaskFiles(
      sft=write_jsonl(path("sft.jsonl"), (dataclasses.asdict(e) for e in task.sft)),
      preferences=write_jsonl(path("preferences.jsonl"),
                              (dataclasses.asdict(p) for p in task.preferences)),
      train_prompts=write_jsonl(path("train_prompts.jsonl"),
                                ({"prompt": p} for p in task.train_prompts)),
      eval_prompts=write_jsonl(path("eval_prompts.jsonl"),
                               ({"prompt": p} for p in task.eval_prompts)))
