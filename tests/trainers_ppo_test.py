"""Tests for rlhf_jax.trainers.ppo's loop metrics."""

import pytest

from rlhf_jax import data

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)


def test_tokens_per_s_counts_only_real_tokens(tokenizer, tmp_path):
  """Prompts of 3 words in 4 slots and completions of at most 4 tokens (cut at their EOS): the
  rate times the iteration's time is rows x (prompt tokens + mean completion length), not the
  rows x 8 slots."""
  trainer, _ = tiny_ppo.trainer(tokenizer, tmp_path, max_steps=2, eval_every=0)
  prompt_tokens = data.encode_prompts(tokenizer, tiny_ppo.prompts(), 4).mask.sum(axis=1)
  assert len(set(prompt_tokens)) == 1 and prompt_tokens[0] < 4   # every prompt row is padded
  trainer.train()
  for record in trainer.history:
    want = 8 * (prompt_tokens[0] + record["response_length"])
    assert record["tokens_per_s"] * record["iteration_s"] == pytest.approx(want, rel=1e-6)
