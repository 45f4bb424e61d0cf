"""Host-side evaluation of a policy's completions on held-out prompts.

Small pure functions over NumPy arrays and Python lists, called after the jitted evaluation program
has been read back: decoding, distinct-n, win rate against the reference, gold scores, the
reward-hacking monitor and the samples table that both the trainer and the pipeline write.
"""

import dataclasses
import importlib
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
  """Decoded completions: the valid tokens of each row without the tokenizer's special tokens
  (its EOS, and a chat template's end-of-turn marker such as `<|im_end|>`), as the prompts are
  decoded and as TRL hands completions to reward functions: a format or exact-match reward
  sees the answer, not the template's markup."""
  return tokenizer.batch_decode(valid_rows(ids, mask), skip_special_tokens=True)


def gold_scores(gold_fn: Callable[[str], float], texts: Sequence[str]) -> np.ndarray:
  """[len(texts)] float64 scores of a judge the policy never sees (the "gold" reward of Gao et
  al. 2023, "Scaling Laws for Reward Model Overoptimization"): gold_fn(text_i)."""
  return np.array([gold_fn(t) for t in texts], np.float64)


def load_gold_judge(spec: str) -> Callable[[str], float]:
  """The text -> score function named by "package.module:function" (e.g. a held-out reward
  model or a rule-based judge of your task), imported so a config string can pick it.

  Raises:
    ValueError: `spec` is not "module:function", or the module lacks the function, or it is not
      callable. ImportError from the module propagates.
  """
  module_name, sep, name = spec.partition(":")
  if not sep or not module_name or not name:
    raise ValueError(f"gold judge {spec!r} must be 'package.module:function'")
  fn = getattr(importlib.import_module(module_name), name, None)
  if not callable(fn):
    raise ValueError(f"gold judge {spec!r}: {module_name} has no callable {name!r}")
  return fn


def eval_metrics(raw: np.ndarray, ref_raw: np.ndarray, device_metrics: Mapping[str, Any],
                 rows: Sequence[Sequence[int]], ref_rows: Sequence[Sequence[int]],
                 gold: np.ndarray | None = None,
                 ref_gold: np.ndarray | None = None) -> dict[str, float]:
  """The numeric eval record from host arrays.

  Args:
    raw, ref_raw: [B] reward-model scores of the policy's and the reference's completions.
    device_metrics: `score`'s metrics of the policy's completions (kl, response_length, eos_rate).
    rows, ref_rows: The policy's and the reference's valid completion tokens (see `valid_rows`).
    gold, ref_gold: [B] gold scores of the policy's and the reference's completions (see
      `gold_scores`), if judged.

  Every mean comes with its standard error (key + "_se"): std(x, ddof=1) / sqrt(B), 0 for B = 1.
  """
  out = {
      "eval_reward": float(raw.mean()),
      "eval_reward_se": _standard_error(raw),
      "eval_ref_reward": float(ref_raw.mean()),
      "eval_ref_reward_se": _standard_error(ref_raw),
      "eval_win_rate": win_rate(raw, ref_raw),
      "eval_kl": float(device_metrics["kl"]),
      "eval_response_length": float(device_metrics["response_length"]),
      "eval_eos_rate": float(device_metrics["eos_rate"]),
      "eval_distinct_1": distinct_n(rows, 1),
      "eval_distinct_2": distinct_n(rows, 2),
      "eval_ref_distinct_2": distinct_n(ref_rows, 2),
  }
  if (gold is None) != (ref_gold is None):
    raise ValueError("gold and ref_gold are given together or not at all")
  if gold is not None:
    out["gold_score"] = float(np.mean(gold))
    out["gold_score_se"] = _standard_error(gold)
    out["ref_gold_score"] = float(np.mean(ref_gold))
    out["ref_gold_score_se"] = _standard_error(ref_gold)
  return out


def _standard_error(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The reward-hacking monitor's answer: whether it fired, why (or why not), and the signals
  behind it (logged with every evaluation)."""
  flag: bool
  reason: str
  signals: Mapping[str, float]


def reward_hacking(history: Sequence[Mapping[str, Any]], *, gold_z: float = 3.0,
                   max_kl_per_token: float = 1.0, min_distinct_ratio: float = 0.5) -> Verdict:
  """Whether the latest evaluation shows the policy exploiting its reward model.

  With a gold judge (every evaluation has "gold_score"), it fires when the gold score has fallen
  significantly from its best while the reward-model score has not:
    gold_best - gold_now > z * sqrt(gse_best^2 + gse_now^2)  and
    proxy_best - proxy_now <= z * sqrt(pse_best^2 + pse_now^2),
  best being the highest gold score so far, the reference's included (the policy starts as the
  reference, so a policy that games the reward model before the first evaluation still drops
  from there), proxy the reward-model score ("eval_reward"; the reference's "eval_ref_reward"),
  se their standard errors (the keys + "_se", see `eval_metrics`) and z = `gold_z`. This is
  the overoptimisation of Gao et al. 2023: past a point the proxy keeps its gains (or grows)
  while the true reward turns down. Margins in standard errors hold for any judge's and reward
  model's scale; a proxy that is saturated and noisy cannot hide the divergence, and a policy
  that gets worse on both is not hacking its reward model.

  Supporting signals, reported either way: the KL to the reference per completion token above
  `max_kl_per_token` ("eval_kl" / "eval_response_length"), and distinct-2 below
  `min_distinct_ratio` times the reference's ("eval_distinct_2", "eval_ref_distinct_2"): the
  policy far from the reference and repeating itself. Without a gold judge the monitor can only
  fire on these, and fires when both hold.

  Reads `history` (evaluations, oldest first); changes nothing.

  Returns:
    Verdict; its signals: hacking_kl_alarm, hacking_diversity_alarm (0 / 1) and, with gold,
    hacking_gold_drop (gold_best - gold_now) and hacking_gold_margin (the drop it needs).
  """
  if gold_z <= 0 or max_kl_per_token <= 0 or not 0 < min_distinct_ratio < 1:
    raise ValueError(f"the reward-hacking monitor needs gold_z > 0, max_kl_per_token > 0 and "
                     f"0 < min_distinct_ratio < 1; got {gold_z}, {max_kl_per_token}, "
                     f"{min_distinct_ratio}")
  if not history:
    return Verdict(False, "no evaluation yet", {})
  now = history[-1]
  kl_per_token = now["eval_kl"] / max(now["eval_response_length"], 1.0)
  kl_alarm = kl_per_token > max_kl_per_token
  diversity_alarm = now["eval_distinct_2"] < min_distinct_ratio * now["eval_ref_distinct_2"]
  signals = {"hacking_kl_alarm": int(kl_alarm), "hacking_diversity_alarm": int(diversity_alarm)}
  support = (f"KL {kl_per_token:.2f} nats/token ({'above' if kl_alarm else 'within'} "
             f"{max_kl_per_token:g}), distinct-2 {now['eval_distinct_2']:.3f} "
             f"({'below' if diversity_alarm else 'at least'} {min_distinct_ratio:g} x the "
             f"reference's {now['eval_ref_distinct_2']:.3f})")
  if any("gold_score" not in e for e in history):
    return Verdict(kl_alarm and diversity_alarm,
                   f"no gold judge, so KL and distinct-n only: {support}", signals)
  first = history[0]
  start = {"eval_reward": first["eval_ref_reward"], "eval_reward_se": first["eval_ref_reward_se"],
           "gold_score": first["ref_gold_score"], "gold_score_se": first["ref_gold_score_se"]}
  points = [start, *history]
  best_i = int(np.argmax([e["gold_score"] for e in points]))
  best = points[best_i]
  where = "the reference's" if best_i == 0 else f"at evaluation {best_i} of {len(history)}"
  drop = best["gold_score"] - now["gold_score"]
  margin = gold_z * float(np.hypot(best["gold_score_se"], now["gold_score_se"]))
  proxy_margin = gold_z * float(np.hypot(best["eval_reward_se"], now["eval_reward_se"]))
  proxy_held = best["eval_reward"] - now["eval_reward"] <= proxy_margin
  signals.update(hacking_gold_drop=drop, hacking_gold_margin=margin)
  reason = (f"gold score {now['gold_score']:.3f}, {drop:.3f} below its best "
            f"{best['gold_score']:.3f} ({where}; a drop of more than {margin:.3f} = "
            f"{gold_z:g} standard errors counts), reward-model score "
            f"{now['eval_reward']:.3f} {'held' if proxy_held else 'fell'} from "
            f"{best['eval_reward']:.3f} there (by {proxy_margin:.3f} at most); {support}")
  return Verdict(drop > margin and proxy_held, reason, signals)


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
