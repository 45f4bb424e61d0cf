"""`collect`: the experience half of one RL iteration, as one pure function.

rollout (the policy samples completions) -> the critic's values at sampling time -> score
(reference log-probs, per-token KL, rewards) -> a `Scored` batch that `ppo_update` consumes. The
trainer, the tests and the benchmark all call this one function, so what is measured is what
trains.
"""

from typing import Any

import jax
from flax import nnx

from rlhf_jax.models import lora
from rlhf_jax.ppo import PPOConfig, TrainState
from rlhf_jax.rollout import completion_hidden, rollout
from rlhf_jax.score import RewardFn, RewardNorm, Scored, score


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
  values = cfg.critic_impl.values(
      state.value_graphdef, params["value"], ro,
      lambda: completion_hidden(nnx.merge(state.policy_graphdef, policy_params), ro))
  scored, metrics = score(cfg, ro, ref_graphdef=ref_graphdef, ref_params=ref_params,
                          reward_fn=reward_fn, reward_params=reward_params,
                          kl_coef=state.kl.coef, reward_norm=reward_norm)
  return scored.replace(values=values), metrics
