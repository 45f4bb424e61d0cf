"""A verifiable-reward task: two-operand sums, "12 + 7 =" -> "19".

Every problem a + b with 0 <= a, b < max_operand; a held-out set of distinct problems is never
used for SFT or RL. The answer is checked by exact match of the decoded completion against the
sum computed from the prompt (`solve`; the `arithmetic` reward of `rlhf_jax.rewards`), so RL
needs no reward model (the setting of DeepSeek-R1's rule rewards, Guo et al. 2025,
arXiv:2501.12948, shrunk to a word-level tokenizer where each number is one token).

Written in the default task's formats (`DefaultTask`, `write_default_task`: sft.jsonl,
train_prompts.jsonl, eval_prompts.jsonl; no preference pairs).
"""

import re

import numpy as np

from rlhf_jax.data.loaders import SFTExample
from rlhf_jax.data.synthetic import DefaultTask

_PROMPT = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")
_SPLIT_STREAM, _SFT_STREAM, _PROMPT_STREAM = range(3)


def vocabulary(max_operand: int) -> list[str]:
  """Every word of the task: the numbers 0 .. 2 (max_operand - 1), "+" and "="."""
  return [str(i) for i in range(2 * max_operand - 1)] + ["+", "="]


def prompt_of(a: int, b: int) -> str:
  return f"{a} + {b} ="


def solve(prompt: str) -> int | None:
  """a + b of a prompt "a + b =" (surrounding spaces allowed); None for any other text."""
  m = _PROMPT.fullmatch(prompt)
  return int(m[1]) + int(m[2]) if m else None


def exact_match(prompt: str, completion: str) -> float:
  """1.0 if the completion is exactly the prompt's sum (surrounding spaces ignored), else 0.0."""
  want = solve(prompt)
  return float(want is not None and completion.strip() == str(want))


def make_arithmetic_task(seed: int = 0, n_sft: int = 2000, n_prompts: int = 2048,
                         n_eval_prompts: int = 64, max_operand: int = 20,
                         sft_noise: float = 0.0) -> DefaultTask:
  """The task, a pure function of its arguments.

  Args:
    seed: Seeds the held-out split, the demonstrations and the RL prompts.
    n_sft: Demonstrations "a + b =" -> "a+b", drawn with replacement from the training problems.
    n_prompts: RL training prompts, drawn with replacement from the training problems.
    n_eval_prompts: Distinct held-out problems (at most half of all max_operand^2).
    max_operand: Operands are 0 .. max_operand - 1.
    sft_noise: Share of demonstrations whose answer is off by one (a + b +- 1, clipped to the
      vocabulary): a demonstrator with a systematic slip, the kind of error the verifier's
      reward lets RL unlearn.
  """
  if not 0.0 <= sft_noise <= 1.0:
    raise ValueError(f"task.sft_noise must be in [0, 1], got {sft_noise}")
  if max_operand < 2:
    raise ValueError(f"task.max_operand must be >= 2, got {max_operand}")
  problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
  if not 0 < n_eval_prompts <= len(problems) // 2:
    raise ValueError(f"n_eval_prompts={n_eval_prompts} must be in [1, {len(problems) // 2}] "
                     f"(half the {len(problems)} problems of max_operand={max_operand})")
  order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(problems))
  held_out = [problems[i] for i in order[:n_eval_prompts]]
  train = [problems[i] for i in order[n_eval_prompts:]]
  rng = np.random.default_rng([seed, _SFT_STREAM])
  sft = []
  for i, slip, sign in zip(rng.integers(len(train), size=n_sft), rng.random(n_sft) < sft_noise,
                           rng.choice((-1, 1), size=n_sft)):
    a, b = train[i]
    answer = min(max(a + b + sign * slip, 0), 2 * max_operand - 2)
    sft.append(SFTExample(prompt_of(a, b), str(answer)))
  rng = np.random.default_rng([seed, _PROMPT_STREAM])
  prompts = [prompt_of(*train[i]) for i in rng.integers(len(train), size=n_prompts)]
  return DefaultTask(sft=sft, preferences=[], train_prompts=prompts,
                     eval_prompts=[prompt_of(a, b) for a, b in held_out])
