"""Rewards by name, and weighted sums of them, as one `RewardFn` for `collect`.

Three kinds of reward are registered in `REWARDS`:

  model:  the reward model (`reward_model`): a ScalarModel read at the last real token, on device;
  tokens: fn(cfg: RewardsConfig, rollout) -> [B], jittable, on device (e.g. `length_penalty`,
          DAPO's `overlong`);
  text:   fn(cfg: RewardsConfig, prompt: str, completion: str) -> float, run on the host on the
          decoded texts (a format regex, an exact-match verifier, a rule of your task).

`make_reward_fn` sums them with weights (`RewardsConfig.terms = "reward_model+0.5*format"`) into
one RewardFn returning (total [B], {name: [B] unweighted}); `score` logs each term's mean as
`reward/<name>`. The text terms go through one `jax.pure_callback` (decode once, every text term
on the same strings), so `collect` stays one jitted program and the reward model never leaves the
device. A fork registers its own with `@register_text_reward("name")` /
`@register_token_reward("name")` in a plugin module (`--config.plugins`, `rlhf_jax.plugins`).
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.data.arithmetic import exact_match
from rlhf_jax.registry import Registry
from rlhf_jax.rollout import Rollout
from rlhf_jax.score import RewardFn, reward_model_fn

_TERM = re.compile(r"\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-]?\d+)?)\s*\*\s*)?([A-Za-z_][\w.]*)\s*")


class Reward(NamedTuple):
  """A registered reward: its kind ("model", "tokens" or "text") and function."""
  kind: str
  fn: Callable | None


REWARDS: Registry[Reward] = Registry("reward")


def parse_terms(terms: str) -> tuple[tuple[float, str], ...]:
  """"reward_model+0.5*format+-0.1*length_penalty" -> ((1.0, "reward_model"), (0.5, "format"),
  (-0.1, "length_penalty")): terms joined by "+", each "name" (weight 1) or "weight*name"."""
  out = []
  for term in terms.split("+") if terms.strip() else []:
    m = _TERM.fullmatch(term)
    if m is None:
      raise ValueError(f"reward term {term!r} of {terms!r} is not 'name' or 'weight*name'")
    out.append((float(m[1]) if m[1] else 1.0, m[2]))
  if not out:
    raise ValueError("rewards.terms is empty: name at least one reward (e.g. reward_model)")
  names = [n for _, n in out]
  if len(set(names)) != len(names):
    raise ValueError(f"rewards.terms {terms!r} names a reward twice")
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class RewardsConfig:
  """What the policy is rewarded with.

  Attributes:
    terms: Weighted sum of registered rewards, "name" or "weight*name" joined by "+", e.g.
      "reward_model" (the default), "arithmetic", "reward_model+0.5*format+0.2*length_penalty".
    format_regex: The "format" reward is 1 when the decoded completion matches this regular
      expression in full (`re.fullmatch`), else 0.
    overlong_buffer: L_buf of DAPO's soft overlong punishment ("overlong", Yu et al. 2025,
      arXiv:2503.14476, eq. 13): 0 for lengths up to L_max - L_buf, then linear down to -1 at
      L_max = sampling.max_new_tokens.
  """
  terms: str = "reward_model"
  format_regex: str = r".*\S.*"
  overlong_buffer: int = 4

  def __post_init__(self):
    for _, name in parse_terms(self.terms):
      REWARDS.get(name)
    try:
      re.compile(self.format_regex)
    except re.error as e:
      raise ValueError(f"rewards.format_regex {self.format_regex!r} is not a regex: {e}") from None
    if self.overlong_buffer < 1:
      raise ValueError(f"rewards.overlong_buffer must be >= 1, got {self.overlong_buffer}")

  @property
  def uses_reward_model(self) -> bool:
    return any(REWARDS.get(n).kind == "model" for _, n in parse_terms(self.terms))


def register_text_reward(name: str):
  """Decorator registering fn(cfg: RewardsConfig, prompt: str, completion: str) -> float."""
  register = REWARDS.register(name)

  def decorator(fn):
    register(Reward("text", fn))
    return fn
  return decorator


def register_token_reward(name: str):
  """Decorator registering a jittable fn(cfg: RewardsConfig, rollout) -> [B] float32."""
  register = REWARDS.register(name)

  def decorator(fn):
    register(Reward("tokens", fn))
    return fn
  return decorator


REWARDS.register("reward_model")(Reward("model", None))


@register_token_reward("length_penalty")
def length_penalty(cfg: RewardsConfig, rollout: Rollout) -> jax.Array:
  """-L_i / N: minus the completion's length (EOS included) over the length budget N."""
  del cfg
  mask = rollout.completion_mask
  return -jnp.sum(mask > 0, axis=-1, dtype=jnp.float32) / mask.shape[1]


@register_token_reward("overlong")
def overlong_penalty(cfg: RewardsConfig, rollout: Rollout) -> jax.Array:
  """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), with
  L_max = N the length budget and L_buf = cfg.overlong_buffer:
  R(L) = 0 if L <= L_max - L_buf; (L_max - L_buf - L) / L_buf if L_max - L_buf < L <= L_max."""
  mask = rollout.completion_mask
  length = jnp.sum(mask > 0, axis=-1, dtype=jnp.float32)
  start = mask.shape[1] - cfg.overlong_buffer
  return jnp.minimum(0.0, (start - length) / cfg.overlong_buffer)


@register_text_reward("format")
def format_reward(cfg: RewardsConfig, prompt: str, completion: str) -> float:
  """1 if re.fullmatch(cfg.format_regex, completion) else 0."""
  del prompt
  return float(re.fullmatch(cfg.format_regex, completion) is not None)


@register_text_reward("arithmetic")
def arithmetic_reward(cfg: RewardsConfig, prompt: str, completion: str) -> float:
  """1 if the completion is the sum asked by the prompt "a + b =", else 0
  (`data.arithmetic.exact_match`)."""
  del cfg
  return exact_match(prompt, completion)


def _text_scores(cfg: RewardsConfig, fns: list[Callable], tokenizer, rollout: Rollout) -> jax.Array:
  """[B, len(fns)] float32 text rewards of the decoded prompts and completions, on the host."""
  from rlhf_jax import evaluation   # the decoding helpers; evaluation imports nothing of ours

  def host(*arrays):
    # Host copies first: a JAX op inside the callback (iterating over a jax.Array) can deadlock
    # the runtime that is waiting on this callback.
    prompt_ids, prompt_mask, completion_ids, completion_mask = (np.asarray(a) for a in arrays)
    prompts = tokenizer.batch_decode(evaluation.valid_rows(prompt_ids, prompt_mask),
                                     skip_special_tokens=True)
    texts = evaluation.completion_texts(tokenizer, completion_ids, completion_mask)
    return np.array([[fn(cfg, p, c) for fn in fns] for p, c in zip(prompts, texts)],
                    np.float32).reshape(len(texts), len(fns))

  b = rollout.completion_ids.shape[0]
  return jax.pure_callback(host, jax.ShapeDtypeStruct((b, len(fns)), jnp.float32),
                           rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                           rollout.completion_mask)


def make_reward_fn(cfg: RewardsConfig, *, tokenizer=None,
                   reward_graphdef: nnx.GraphDef | None = None) -> RewardFn:
  """The RewardFn of `cfg.terms`: fn(reward_params, rollout) -> (sum_k w_k r_k [B],
  {name_k: r_k [B]}); `reward_params` are the reward model's (None without one).

  Args:
    cfg: RewardsConfig.
    tokenizer: Decodes the rollouts for text rewards (needed only with a text term).
    reward_graphdef: The reward model's graph (needed only with the `reward_model` term).
  """
  terms = [(w, n, REWARDS.get(n)) for w, n in parse_terms(cfg.terms)]
  text = [(n, r.fn) for _, n, r in terms if r.kind == "text"]
  if text and tokenizer is None:
    raise ValueError(f"text rewards {[n for n, _ in text]} need a tokenizer")
  if text and jax.process_count() > 1:
    raise ValueError("text rewards run on one host: not supported in a multi-process run")
  if any(r.kind == "model" for _, _, r in terms) and reward_graphdef is None:
    raise ValueError("the reward_model term needs the reward model (reward_graphdef)")
  model_fn = reward_model_fn(reward_graphdef) if reward_graphdef is not None else None

  def fn(params: Any, rollout: Rollout):
    host = _text_scores(cfg, [f for _, f in text], tokenizer, rollout) if text else None
    parts = {}
    for _, name, r in terms:
      if r.kind == "model":
        parts[name] = model_fn(params, rollout)
      elif r.kind == "tokens":
        parts[name] = r.fn(cfg, rollout)
      else:
        parts[name] = host[:, [n for n, _ in text].index(name)]
    parts = {k: v.astype(jnp.float32) for k, v in parts.items()}
    total = sum(w * parts[name] for w, name, _ in terms)
    return total, parts

  return fn
