"""`score`: rewards for a rollout, from a reward model or a plain reward function, with the KL
penalty against the frozen reference policy.

The implementation details that decide whether RLHF works (Huang et al. 2024, "The N Implementation
Details of RLHF with PPO"): the reward model is read at the last real token (the EOS when present);
policy and reference log-probs use the sampling temperature; completions without EOS can be
penalised; the KL to the reference is estimated per token and either subtracted from the per-token
reward (Ziegler et al. 2019) with the sequence score added at the last token, or left to the loss.
"""

from typing import TYPE_CHECKING, Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import kl as kl_lib
from rlhf_jax.logprobs import chunked_token_logprobs
from rlhf_jax.masked import last_valid_mask, masked_mean, masked_sum, masked_whiten
from rlhf_jax.rollout import Rollout, completion_hidden

if TYPE_CHECKING:   # ppo imports this module
  from rlhf_jax.ppo import PPOConfig

# A reward: fn(reward_params, rollout) -> scores [B], or (scores [B], {term name: [B]}) for a
# weighted sum whose terms are logged (`rlhf_jax.rewards`). `reward_params` is any pytree (None
# for rule-based rewards), passed as a jit argument so weights are never baked into the program.
RewardFn = Callable[[Any, Rollout], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]


def reward_terms(reward_fn: RewardFn, reward_params: Any,
                 rollout: Rollout) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(float32 scores [B], {term name: [B]}) of a RewardFn of either form ({} for a plain one)."""
  out = reward_fn(reward_params, rollout)
  raw, terms = out if isinstance(out, tuple) else (out, {})
  chex.assert_shape([raw, *terms.values()], (rollout.completion_mask.shape[0],))
  return raw.astype(jnp.float32), terms


@flax.struct.dataclass
class RewardNorm:
  """Affine reward-model normalisation score = gain * raw + bias (Ziegler et al. 2019: chosen so
  scores of the initial policy's samples have mean 0 and std 1)."""
  gain: jax.Array
  bias: jax.Array

  @classmethod
  def identity(cls) -> "RewardNorm":
    return cls(gain=jnp.ones((), jnp.float32), bias=jnp.zeros((), jnp.float32))

  @classmethod
  def calibrate(cls, raw_scores: jax.Array) -> "RewardNorm":
    """Gain and bias that map `raw_scores` to mean 0, std 1."""
    mean, std = raw_scores.mean(), raw_scores.std()
    gain = 1.0 / jnp.maximum(std, 1e-6)
    return cls(gain=gain.astype(jnp.float32), bias=(-mean * gain).astype(jnp.float32))


@flax.struct.dataclass
class Scored:
  """A rollout with everything `ppo_update` needs besides the train state.

  Attributes:
    rollout: The sampled completions.
    ref_logprobs: [B, N] reference-policy log-probs of the completion tokens (0 on padding).
    kl: [B, N] per-token KL estimate (0 on padding).
    raw_scores: [B] reward before normalisation and penalties.
    scores: [B] sequence score after normalisation, EOS penalty and whitening.
    token_rewards: [B, N] per-token reward: -coef * kl (KL in reward) plus the score at the last
      valid token.
    values: [B, N] critic values at sampling time, or None without a critic.
    trainer_logprobs: [B, N] the completion's log-probs under the trainer's forward of the
      sampling policy (`collect` fills them; `rlhf_jax.mismatch`), or None.
    baselines: [B] the return sum_t r_t of the greedy completion of each row's prompt, scored
      the same way (`collect` fills them for the "remax" estimator), or None.
  """
  rollout: Rollout
  ref_logprobs: jax.Array
  kl: jax.Array
  raw_scores: jax.Array
  scores: jax.Array
  token_rewards: jax.Array
  values: jax.Array | None = None
  trainer_logprobs: jax.Array | None = None
  baselines: jax.Array | None = None


def completion_logprobs(model, rollout: Rollout, hidden: jax.Array | None = None,
                        with_entropy: bool = False):
  """log pi(completion_t | prefix) under softmax(logits / T), [B, N], 0 on padding.

  T is the temperature the rollout was sampled at. `hidden`: the model's `completion_hidden`, when
  the caller has it already. With `with_entropy`, also the per-token entropy of that distribution.
  """
  if hidden is None:
    hidden = completion_hidden(model, rollout)
  # In chunks of positions: the full [B, N, V] float32 logits never exist at once.
  out = chunked_token_logprobs(hidden, model.logits, rollout.completion_ids,
                               chunk_size=model.cfg.logits_chunk_size,
                               temperature=rollout.temperature, with_entropy=with_entropy)
  valid = rollout.completion_mask > 0
  if with_entropy:
    return tuple(jnp.where(valid, x, 0.0) for x in out)
  return jnp.where(valid, out, 0.0)


def reward_model_fn(graphdef: nnx.GraphDef) -> RewardFn:
  """A RewardFn reading a ScalarModel at the last real token of prompt + completion."""
  def fn(params, rollout: Rollout) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(rollout.sequences, attention_mask=rollout.sequence_mask)
  return fn


def score(cfg: "PPOConfig", rollout: Rollout, *, ref_graphdef: nnx.GraphDef,
          ref_params: nnx.State, reward_fn: RewardFn, reward_params: Any,
          kl_coef: jax.Array,
          reward_norm: RewardNorm | None = None) -> tuple[Scored, dict[str, jax.Array]]:
  """Scores a rollout and builds per-token rewards.

  score_i = gain * r_i + bias - penalty * [no EOS in completion i]   (optionally whitened)
  kl_{i,t} = estimator(log pi(y_t), log pi_ref(y_t))                 (masked)
  token_reward_{i,t} = -beta * kl_{i,t} * [KL in reward] + score_i * [t = last valid token]

  Args:
    cfg: PPOConfig (static): reads `kl`, `missing_eos_penalty` and `whiten_scores`.
    rollout: from `rollout`; its `logprobs` are the policy's sampling log-probs, at the
      temperature it records.
    ref_graphdef, ref_params: the frozen reference policy.
    reward_fn, reward_params: the reward (a reward model via `reward_model_fn`, or any
      jittable function of the rollout, e.g. a verifiable/rule-based reward).
    kl_coef: beta, a float32 scalar (from the KL controller).
    reward_norm: affine normalisation of the raw scores (identity if None).

  Returns:
    (Scored without values: `collect` adds the critic's, metrics).
  """
  mask = rollout.completion_mask
  chex.assert_rank([mask, rollout.logprobs], 2)
  ref_logprobs = completion_logprobs(nnx.merge(ref_graphdef, ref_params), rollout)
  kl = jnp.where(mask > 0, kl_lib.kl_penalty(cfg.kl.estimator, rollout.logprobs, ref_logprobs), 0.0)
  raw, terms = reward_terms(reward_fn, reward_params, rollout)
  norm = reward_norm if reward_norm is not None else RewardNorm.identity()
  scores = norm.gain * raw + norm.bias
  eos = rollout.finished
  scores = scores - cfg.missing_eos_penalty * (1.0 - eos.astype(jnp.float32))
  if cfg.whiten_scores:
    scores = masked_whiten(scores, jnp.ones_like(scores))
  token_rewards = jnp.where(last_valid_mask(mask), scores[:, None], 0.0)
  if cfg.kl.in_reward:
    token_rewards = token_rewards - kl_coef * kl
  seq_kl = masked_sum(kl, mask, axis=-1)
  lengths = mask.sum(-1)
  metrics = {
      "reward_mean": scores.mean(),
      "reward_std": scores.std(),
      "raw_score_mean": raw.mean(),
      "kl": seq_kl.mean(),
      "kl_per_token": masked_mean(kl, mask),
      "kl_coef": jnp.asarray(kl_coef, jnp.float32),
      "non_score_reward": -(kl_coef * seq_kl).mean(),
      "response_length": lengths.mean(),
      "eos_rate": eos.astype(jnp.float32).mean(),
      **{f"reward/{name}": r.mean() for name, r in terms.items()},
  }
  return Scored(rollout=rollout, ref_logprobs=ref_logprobs, kl=kl, raw_scores=raw, scores=scores,
                token_rewards=token_rewards), metrics
