"""`collect`: the experience half of one RL iteration, as one pure function.

rollout (the policy samples completions) -> the trainer's forward on them where something reads
it (log-probs for the rollout/trainer mismatch, `rlhf_jax.mismatch`; the trunk of a shared
critic) and the critic's values -> score
(reference log-probs, per-token KL, rewards) -> a `Scored` batch that `ppo_update` consumes. The
trainer, the tests and the benchmark all call this one function, so what is measured is what
trains.
"""

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from rlhf_jax.masked import masked_sum
from rlhf_jax.mismatch import mismatch_metrics
from rlhf_jax.models import lora
from rlhf_jax.ppo import PPOConfig, TrainState
from rlhf_jax.rollout import completion_hidden, rollout
from rlhf_jax.score import RewardFn, RewardNorm, Scored, completion_logprobs, score


def collect(cfg: PPOConfig, state: TrainState, prompt_ids: jax.Array, prompt_mask: jax.Array,
            rng: jax.Array, *, ref_graphdef: nnx.GraphDef, ref_params: nnx.State | None,
            reward_fn: RewardFn, reward_params: Any, reward_norm: RewardNorm | None = None,
            frozen: dict | None = None) -> tuple[Scored, dict[str, jax.Array]]:
  """Samples completions for a batch of prompts and scores them.

  Pure; jit it with the static parts bound:
  `jax.jit(functools.partial(collect, cfg, ref_graphdef=g, reward_fn=f))`, then call it with
  `(state, prompt_ids, prompt_mask, rng, ref_params=..., reward_params=..., reward_norm=...)`.

  Args:
    cfg: PPOConfig (static); `cfg.sampling` must carry the EOS / padding ids
      (`SamplingConfig.with_special_tokens`).
    state: TrainState: the policy samples, the critic gives values, `state.kl.coef` is beta.
    prompt_ids, prompt_mask: [B, P] left padded; a group's G prompts in consecutive rows.
    rng: PRNG key of the sampler.
    ref_graphdef, ref_params: the frozen reference policy; ref_params None: the policy's own
      frozen base (`frozen["policy"]`, LoRA with the adapters off: `lora.base`'s graphdef), so
      no second copy of the weights exists.
    reward_fn, reward_params: the reward (see `rlhf_jax.score.RewardFn`).
    reward_norm: affine normalisation of the raw scores (identity if None).
    frozen: the frozen base weights under LoRA (`ppo.frozen_params`), None without.

  Returns:
    (Scored with the critic's values, or None without a critic; score metrics).
  """
  params = lora.join(frozen, state.params)
  policy_params = params["policy"]
  if ref_params is None:
    if frozen is None or frozen.get("policy") is None:
      raise ValueError("ref_params=None needs the policy's frozen base in `frozen` (LoRA)")
    ref_params = frozen["policy"]
  ro = rollout(state.policy_graphdef, policy_params, prompt_ids, prompt_mask, rng, cfg.sampling)
  # The trainer's forward on the sampled tokens, traced at most once: the mismatch metrics and
  # corrections, pi_old when recomputed, and the trunk a shared critic reads.
  policy = nnx.merge(state.policy_graphdef, policy_params)
  hidden = functools.cache(lambda: completion_hidden(policy, ro))
  trainer_logprobs = (completion_logprobs(policy, ro, hidden())
                      if cfg.mismatch.needs_trainer_logprobs else None)
  values = cfg.critic_impl.values(state.value_graphdef, params["value"], ro, hidden)
  scored, metrics = score(cfg, ro, ref_graphdef=ref_graphdef, ref_params=ref_params,
                          reward_fn=reward_fn, reward_params=reward_params,
                          kl_coef=state.kl.coef, reward_norm=reward_norm)
  if trainer_logprobs is not None:
    metrics.update(mismatch_metrics(trainer_logprobs, ro.logprobs, ro.completion_mask))
  baselines = None
  if cfg.advantage.estimator == "remax":
    # ReMax's baseline (Li et al. 2023): the greedy completion of the same prompt, same reward.
    greedy = rollout(state.policy_graphdef, policy_params, prompt_ids, prompt_mask, rng,
                     dataclasses.replace(cfg.sampling, greedy=True))
    greedy_scored, _ = score(cfg, greedy, ref_graphdef=ref_graphdef, ref_params=ref_params,
                             reward_fn=reward_fn, reward_params=reward_params,
                             kl_coef=state.kl.coef, reward_norm=reward_norm)
    baselines = masked_sum(greedy_scored.token_rewards, greedy.completion_mask, axis=-1)
    metrics["remax_baseline_mean"] = baselines.mean()
  return scored.replace(values=values, trainer_logprobs=trainer_logprobs,
                        baselines=baselines), metrics
