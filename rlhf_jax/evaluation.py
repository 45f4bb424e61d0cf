"""Host-side evaluation of a policy's completions on held-out prompts.

Small pure functions over NumPy arrays and Python lists, called after the jitted evaluation program
has been read back: decoding, distinct-n, win rate against the reference, gold score, the
reward-hacking monitor and the samples table that both the trainer and the pipeline write.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SAMPLES_HEADER = ("| prompt | completion | reward |", "| --- | --- | --- |")


def valid_rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Each row's token ids where mask > 0, in order (drops padding on either side)."""
  if ids.shape != mask.shape:
    raise ValueError(f"ids {ids.shape} and mask {mask.shape} must have the same shape")
  return [row[m > 0].tolist() for row, m in zip(ids, mask)]


def distinct_n(rows: Sequence[Sequence[int]], n: int) -> float:
  """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): |unique n-grams| / |n-grams|, pooled over all rows; 0 without n-grams."""
  if n < 1:
    raise ValueError(f"distinct_n needs n >= 1, got {n}")
  grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
  return len(set(grams)) / max(len(grams), 1)


def win_rate(scores: np.ndarray, ref_scores: np.ndarray) -> float:
  """Pairwise win rate against the reference on the same prompts, ties counting half (as in
  Stiennon et al. 2020 / Ouyang et al. 2022): mean_i(1[s_i > r_i] + 0.5 * 1[s_i == r_i])."""
  scores, ref_scores = np.asarray(scores), np.asarray(ref_scores)
  if scores.shape != ref_scores.shape:
    raise ValueError(f"scores {scores.shape} and ref_scores {ref_scores.shape} must have the "
                     "same shape")
  return float(((scores > ref_scores) + 0.5 * (scores == ref_scores)).mean())


def completion_texts(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """Decoded completions: the valid tokens of each row without the tokenizer's EOS."""
  eos = tokenizer.eos_token_id
  return tokenizer.batch_decode([[t for t in r if t != eos] for r in valid_rows(ids, mask)])


def gold_score(gold_fn: Callable[[str], float], texts: Sequence[str]) -> float:
  """Mean score of a judge the policy never sees (the "gold" reward of Gao et al. 2023, "Scaling
  Laws for Reward Model Overoptimization"): mean_i gold_fn(text_i)."""
  return float(np.mean([gold_fn(t) for t in texts]))


def eval_metrics(raw: np.ndarray, ref_raw: np.ndarray, device_metrics: Mapping[str, Any],
                 rows: Sequence[Sequence[int]], gold: float | None = None,
                 ref_gold: float | None = None) -> dict[str, float]:
  """The numeric eval record from host arrays.

  Args:
    raw, ref_raw: [B] reward-model scores of the policy's and the reference's completions.
    device_metrics: `score`'s metrics of the policy's completions (kl, response_length, eos_rate).
    rows: The policy's valid completion tokens (see `valid_rows`).
    gold, ref_gold: Gold scores of the policy and the reference (see `gold_score`), if judged.
  """
  out = {
      "eval_reward": float(raw.mean()),
      "eval_ref_reward": float(ref_raw.mean()),
      "eval_win_rate": win_rate(raw, ref_raw),
      "eval_kl": float(device_metrics["kl"]),
      "eval_response_length": float(device_metrics["response_length"]),
      "eval_eos_rate": float(device_metrics["eos_rate"]),
      "eval_distinct_1": distinct_n(rows, 1),
      "eval_distinct_2": distinct_n(rows, 2),
  }
  if (gold is None) != (ref_gold is None):
    raise ValueError("gold and ref_gold are given together or not at all")
  if gold is not None:
    out["gold_score"], out["ref_gold_score"] = gold, ref_gold
  return out


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The reward-hacking monitor's answer: whether it fired, and why (or why not)."""
  flag: bool
  reason: str


def reward_hacking(history: Sequence[Mapping[str, Any]], window: int = 3) -> Verdict:
  """Flags reward hacking when, over the last `window` evaluations, the reward model's score
  rose strictly at every step while the gold score fell strictly at every step: the proxy/gold
  divergence of reward-model overoptimisation (Gao et al. 2023). Never fires without gold
  scores or with fewer than `window` evaluations. Reads `history`; changes nothing.

  Args:
    history: Evaluations, oldest first, each with "eval_reward" and (when judged) "gold_score".
    window: Evaluations compared (>= 2).
  """
  if window < 2:
    raise ValueError(f"the reward-hacking window must be >= 2 evaluations, got {window}")
  hist = list(history[-window:])
  if len(hist) < window:
    return Verdict(False, f"{len(hist)} of the {window} evaluations needed")
  if any("gold_score" not in e for e in hist):
    return Verdict(False, "no gold score")
  proxy = [e["eval_reward"] for e in hist]
  gold = [e["gold_score"] for e in hist]
  rising = all(b > a for a, b in zip(proxy, proxy[1:]))
  falling = all(b < a for a, b in zip(gold, gold[1:]))
  trend = (f"reward-model score {'rose' if rising else 'went'} {proxy[0]:.3f} -> "
           f"{proxy[-1]:.3f} while the gold score {'fell' if falling else 'went'} "
           f"{gold[0]:.3f} -> {gold[-1]:.3f} over the last {window} evaluations")
  return Verdict(rising and falling, trend)


def sample_rows(prompts: Sequence[str], completions: Sequence[str], rewards: np.ndarray,
                limit: int) -> list[dict[str, Any]]:
  """The first `limit` (prompt, completion, reward) triples as dicts, rewards as Python floats."""
  return [{"prompt": p, "completion": c, "reward": float(r)}
          for p, c, r in list(zip(prompts, completions, rewards))[:limit]]


def samples_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table "| prompt | completion | reward |" of `sample_rows`' rows, rewards to three
  decimals, lines joined by newlines (no trailing one)."""
  return "\n".join(list(SAMPLES_HEADER) + [
      f"| {s['prompt']} | {s['completion']} | {s['reward']:.3f} |" for s in rows])
