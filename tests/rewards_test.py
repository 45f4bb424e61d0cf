"""rewards: the registry, term parsing, each built-in reward against a NumPy / plain-Python
transcription on padded rows, and the weighted sum (reward model + text + token terms) under jit,
through `score` to its per-term metrics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data, models, rewards
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.ppo import PPOConfig
from rlhf_jax.data import arithmetic
from rlhf_jax.rollout import Rollout, SamplingConfig
from rlhf_jax.score import reward_model_fn, score

WORDS = "good bad fine great . !".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(WORDS, str(tmp_path_factory.mktemp("tok")))


def make_rollout(tokenizer, completions: list[list[str]], n: int = 4) -> Rollout:
  """Rows "good bad" + the given completion words (EOS appended when shorter than n)."""
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  ids = np.full((len(completions), n), pad, np.int32)
  mask = np.zeros((len(completions), n), np.float32)
  for i, words in enumerate(completions):
    toks = tokenizer.convert_tokens_to_ids(words)[:n]
    toks = toks + [eos] if len(toks) < n else toks
    ids[i, :len(toks)], mask[i, :len(toks)] = toks, 1
  prompt = np.asarray([tokenizer.convert_tokens_to_ids(["good", "bad"])] * len(completions))
  return Rollout(prompt_ids=jnp.asarray(prompt, jnp.int32),
                 prompt_mask=jnp.ones(prompt.shape, jnp.int32),
                 completion_ids=jnp.asarray(ids), completion_mask=jnp.asarray(mask),
                 logprobs=jnp.asarray(-0.5 * mask),
                 sampling=SamplingConfig(max_new_tokens=n, eos_token_id=eos, pad_token_id=pad))


# Rows: EOS only (length 1), two words + EOS, a full row cut without EOS, three words + EOS.
COMPLETIONS = [[], ["great", "."], ["good", "good", "fine", "bad"], ["fine", "fine", "!"]]


@pytest.mark.parametrize("terms, want", [
    ("reward_model", ((1.0, "reward_model"),)),
    ("arithmetic", ((1.0, "arithmetic"),)),
    (" reward_model + 0.5*format+-0.1 * length_penalty",
     ((1.0, "reward_model"), (0.5, "format"), (-0.1, "length_penalty"))),
    ("2e-1*overlong", ((0.2, "overlong"),)),
])
def test_parse_terms(terms, want):
  assert rewards.parse_terms(terms) == want


@pytest.mark.parametrize("terms, match", [
    ("", "empty"), ("0.5*", "is not"), ("a b", "is not"), ("format+format", "twice"),
    ("nosuch", "unknown reward 'nosuch'; registered: .*reward_model")])
def test_bad_terms_are_refused(terms, match):
  with pytest.raises(ValueError, match=match):
    rewards.RewardsConfig(terms=terms)


def test_bad_regex_and_buffer_are_refused():
  with pytest.raises(ValueError, match="format_regex"):
    rewards.RewardsConfig(format_regex="(")
  with pytest.raises(ValueError, match="overlong_buffer"):
    rewards.RewardsConfig(overlong_buffer=0)


def test_token_rewards_match_numpy(tokenizer):
  ro = make_rollout(tokenizer, COMPLETIONS)
  lengths = np.array([1, 3, 4, 4], np.float64)   # EOS counted, the cut row full
  n = 4
  np.testing.assert_allclose(rewards.length_penalty(rewards.RewardsConfig(), ro), -lengths / n)
  for buf in (1, 2, 4):
    cfg = rewards.RewardsConfig(overlong_buffer=buf)
    want = [0.0 if l <= n - buf else (n - buf - l) / buf for l in lengths]   # DAPO eq. 13
    np.testing.assert_allclose(rewards.overlong_penalty(cfg, ro), want, rtol=1e-6)


def test_arithmetic_exact_match():
  assert arithmetic.solve("12 + 7 =") == 19 and arithmetic.solve(" 3+4= ") == 7
  assert arithmetic.solve("12 - 7 =") is None and arithmetic.solve("a + 1 =") is None
  cases = [("12 + 7 =", "19", 1.0), ("12 + 7 =", " 19 ", 1.0), ("12 + 7 =", "18", 0.0),
           ("12 + 7 =", "19 19", 0.0), ("12 + 7 =", "", 0.0), ("hello", "19", 0.0)]
  for prompt, completion, want in cases:
    assert arithmetic.exact_match(prompt, completion) == want, (prompt, completion)
    assert rewards.arithmetic_reward(rewards.RewardsConfig(), prompt, completion) == want


def test_arithmetic_task_is_deterministic_and_holds_out_its_eval_problems():
  task = arithmetic.make_arithmetic_task(seed=3, n_sft=200, n_prompts=100, n_eval_prompts=30,
                                         max_operand=10)
  assert task == arithmetic.make_arithmetic_task(seed=3, n_sft=200, n_prompts=100,
                                                 n_eval_prompts=30, max_operand=10)
  assert len(set(task.eval_prompts)) == 30 and not task.preferences
  train = {e.prompt for e in task.sft} | set(task.train_prompts)
  assert not train & set(task.eval_prompts)
  for e in task.sft:
    assert arithmetic.exact_match(e.prompt, e.completion) == 1.0
  vocab = set(arithmetic.vocabulary(10))
  assert all(set(e.prompt.split() + e.completion.split()) <= vocab for e in task.sft)
  with pytest.raises(ValueError, match="n_eval_prompts"):
    arithmetic.make_arithmetic_task(n_eval_prompts=51, max_operand=10)


def test_weighted_sum_of_model_text_and_token_terms_under_jit(tokenizer):
  mcfg = models.DecoderConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=16,
                              num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                              intermediate_size=32, max_position_embeddings=16,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
  graphdef, params = nnx.split(models.ScalarModel(mcfg, rngs=nnx.Rngs(1), head_std=0.5))
  cfg = rewards.RewardsConfig(terms="reward_model+0.5*format+-0.25*length_penalty",
                              format_regex=r"(good|great|fine)( (good|great|fine))*( [.!])?")
  ro = make_rollout(tokenizer, COMPLETIONS)
  fn = rewards.make_reward_fn(cfg, tokenizer=tokenizer, reward_graphdef=graphdef)
  total, parts = jax.jit(fn)(params, ro)
  rm = np.asarray(reward_model_fn(graphdef)(params, ro))
  texts = [" ".join(w) for w in COMPLETIONS]   # decoded without EOS
  fmt = np.array([float(re.fullmatch(cfg.format_regex, t) is not None) for t in texts])
  np.testing.assert_array_equal(fmt, [0, 1, 0, 1])   # the row with "bad" and the empty one fail
  length = -np.array([1, 3, 4, 4]) / 4
  np.testing.assert_allclose(parts["reward_model"], rm, rtol=1e-6)
  np.testing.assert_array_equal(parts["format"], fmt)
  np.testing.assert_allclose(parts["length_penalty"], length)
  np.testing.assert_allclose(total, rm + 0.5 * fmt - 0.25 * length, rtol=1e-5)

  ref_graphdef, ref_params = nnx.split(models.CausalLM(mcfg, rngs=nnx.Rngs(0)))
  scored, metrics = score(PPOConfig(critic="none", advantage=AdvantageConfig(estimator="grpo")), ro,
                          ref_graphdef=ref_graphdef, ref_params=ref_params, reward_fn=fn,
                          reward_params=params, kl_coef=jnp.zeros(()))
  np.testing.assert_allclose(scored.raw_scores, total, rtol=1e-6)
  for name, want in (("reward_model", rm), ("format", fmt), ("length_penalty", length)):
    np.testing.assert_allclose(metrics[f"reward/{name}"], want.mean(), rtol=1e-5)


def test_missing_inputs_are_refused(tokenizer):
  with pytest.raises(ValueError, match="need a tokenizer"):
    rewards.make_reward_fn(rewards.RewardsConfig(terms="format"))
  with pytest.raises(ValueError, match="needs the reward model"):
    rewards.make_reward_fn(rewards.RewardsConfig(), tokenizer=tokenizer)
