"""`ppo_update` and the explicit training state it threads.

One call = one PPO optimisation phase on a scored batch (Schulman et al. 2017; the RLHF recipe of
Ziegler et al. 2019 / Ouyang et al. 2022): advantages from the registered estimator, whitening over
valid tokens, then `lax.scan` over epochs x shuffled minibatches with one optimizer step per
minibatch (its gradient optionally accumulated over microbatches), and the KL controller step.
Losses and estimators are looked up by name in their registries, so a research fork adds one with
a decorator and a config string.
"""

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax import kl as kl_lib
from rlhf_jax import microbatch
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, AdvantageInputs, compute_advantages
from rlhf_jax.critics import CRITICS
from rlhf_jax.losses import (POLICY_LOSSES, VALUE_LOSSES, PolicyLossConfig, ValueLossConfig,
                             loss_normalizer, normalizer_counts, policy_loss, value_loss)
from rlhf_jax.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.mismatch import MismatchConfig, correction_weights
from rlhf_jax.models import lora
from rlhf_jax.rollout import Rollout, SamplingConfig, completion_hidden
from rlhf_jax.score import Scored, completion_logprobs


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The RL algorithm: everything `collect` and `ppo_update` read, each knob in one place.

  Attributes:
    sampling: How completions are drawn (temperature, top-k/p, length budget).
    group_size: Completions sampled per prompt, in consecutive rows (> 1 for the grpo / rloo /
      reinforce++ baselines).
    policy_loss: Name and clipping of the policy loss (registry `POLICY_LOSSES`).
    value_loss: Name and clipping of the value loss (registry `VALUE_LOSSES`).
    advantage: Estimator (registry `ADVANTAGE_ESTIMATORS`), gamma, lambda.
    kl: KL estimator, placement (reward or loss) and controller.
    critic: Registry `CRITICS`: "separate" (a value model of its own), "shared" (a value head on
      the policy trunk: less work, one backbone) or "none" (critic-free estimators).
    ppo_epochs: Passes over the batch.
    num_minibatches: Minibatches per pass; one optimizer step each.
    micro_batch_size: Rows per forward/backward pass inside an optimizer step (None: the whole
      minibatch at once); must divide the minibatch (batch / num_minibatches). The gradients of
      a minibatch's microbatches are summed before its one optimizer update, each microbatch's
      loss term scaled by its share n_k / n of the count the loss normalises by (valid tokens
      for token means (ppo, ppo_dual_clip, reinforce, the value losses, entropy, KL), rows with
      a valid token for grpo's mean of sequence means; `losses.NORMALIZERS`), so the update
      and the metrics equal those of the unsplit minibatch up to float rounding. Advantages
      (group-relative ones included) are computed on the whole batch first, so neither
      minibatches nor microbatches need to keep a group's rows together, and they do not.
    vf_coef: Weight of the value loss.
    ent_coef: Weight of the entropy bonus.
    whiten_advantages: Whiten advantages over the valid tokens of the batch.
    missing_eos_penalty: Subtracted from the score of completions cut before EOS (TRL's
      `missing_eos_penalty`; 0 disables it).
    whiten_scores: Whiten sequence scores over the batch after normalisation.
    mismatch: Sampler / trainer log-prob mismatch: pi_old from the trainer's forward
      (`recompute_logprobs`) and a correction of the advantages by name (`rlhf_jax.mismatch`).
  """
  sampling: SamplingConfig = SamplingConfig()
  group_size: int = 1
  policy_loss: PolicyLossConfig = PolicyLossConfig()
  value_loss: ValueLossConfig = ValueLossConfig()
  advantage: AdvantageConfig = AdvantageConfig()
  kl: kl_lib.KLConfig = kl_lib.KLConfig()
  critic: str = "separate"
  ppo_epochs: int = 4
  num_minibatches: int = 1
  micro_batch_size: int | None = None
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  whiten_advantages: bool = True
  missing_eos_penalty: float = 0.0
  whiten_scores: bool = False
  mismatch: MismatchConfig = MismatchConfig()

  def __post_init__(self):
    critic = CRITICS.get(self.critic)
    POLICY_LOSSES.get(self.policy_loss.name)
    VALUE_LOSSES.get(self.value_loss.name)
    ADVANTAGE_ESTIMATORS.get(self.advantage.estimator)
    kl_lib.KL_ESTIMATORS.get(self.kl.estimator)
    kl_lib.KL_CONTROLLERS.get(self.kl.controller)
    if self.advantage.estimator == "gae" and not critic.has_values:
      raise ValueError(f"advantage estimator 'gae' needs a critic with values, got "
                       f"critic={self.critic!r}")
    if self.group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {self.group_size}")
    if self.ppo_epochs < 1 or self.num_minibatches < 1:
      raise ValueError("ppo_epochs and num_minibatches must be >= 1")
    if self.micro_batch_size is not None and self.micro_batch_size < 1:
      raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")

  @property
  def critic_impl(self):
    return CRITICS.get(self.critic)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during RL training, as one pytree.

  Attributes:
    params: {"policy": State, "value": State | {"head": array} | None}: what is trained. Under
      LoRA (models carrying `lora` adapters), only the adapters (and a critic's head); the
      frozen base weights travel beside the state (`frozen_params`, never donated).
    opt_state: Optax state of `tx` over `params`.
    kl: KL-controller state (the current coefficient).
    rng: PRNG key; per-step streams are derived with fold_in(rng, step).
    step: Number of completed PPO updates.
    policy_graphdef, value_graphdef, tx: static structure (not traced, not checkpointed).
  """
  params: dict[str, Any]
  opt_state: Any
  kl: kl_lib.KLControllerState
  rng: jax.Array
  step: jax.Array
  policy_graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  value_graphdef: nnx.GraphDef | None = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def policy(self) -> nnx.Module:
    return nnx.merge(self.policy_graphdef, self.params["policy"])


def _initial_params(cfg: PPOConfig, policy: nnx.Module, value_model: nnx.Module | None):
  """(policy graphdef, value graphdef, (frozen, trainable) params: `lora.partition`)."""
  policy_graphdef, policy_params = nnx.split(policy)
  value_graphdef, value_params = cfg.critic_impl.init(policy, value_model)
  return policy_graphdef, value_graphdef, lora.partition(
      {"policy": policy_params, "value": value_params})


def init_train_state(cfg: PPOConfig, policy: nnx.Module, tx: optax.GradientTransformation,
                     rng: jax.Array, value_model: nnx.Module | None = None) -> TrainState:
  """Builds the train state from a policy CausalLM and the critic's parameters (`cfg.critic`;
  a "separate" critic is initialised from `value_model`, a ScalarModel). A model with LoRA
  adapters (`lora.add_adapters`) trains only those: its base goes to `frozen_params`."""
  policy_graphdef, value_graphdef, (_, params) = _initial_params(cfg, policy, value_model)
  return TrainState(params=params, opt_state=tx.init(params),
                    kl=kl_lib.init_kl_controller(cfg.kl), rng=rng,
                    step=jnp.zeros((), jnp.int32), policy_graphdef=policy_graphdef,
                    value_graphdef=value_graphdef, tx=tx)


def frozen_params(cfg: PPOConfig, policy: nnx.Module,
                  value_model: nnx.Module | None = None) -> dict[str, nnx.State | None]:
  """The frozen base weights that `init_train_state` leaves out of the state, per model (None
  for a model trained in full); `ppo_update` and `collect` take them as `frozen`."""
  return _initial_params(cfg, policy, value_model)[2][0]


def train_state_shardings(state: TrainState, mesh: jax.sharding.Mesh,
                          rules=sharding_lib.DEFAULT_RULES) -> TrainState:
  """A TrainState of NamedShardings: params by their logical axes, optimizer moments like the
  params they track, everything else replicated."""
  rep = sharding_lib.replicated(mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)
  value = state.params["value"]
  params = {
      "policy": sharding_lib.param_shardings(state.params["policy"], mesh, rules),
      "value": (sharding_lib.param_shardings(value, mesh, rules) if isinstance(value, nnx.State)
                else jax.tree.map(lambda _: rep, value)),
  }
  opt_state = optax.tree_map_params(state.tx, lambda _, s: s, state.opt_state, params,
                                    transform_non_params=lambda _: rep, is_leaf=is_var)
  return state.replace(params=params, opt_state=opt_state, kl=jax.tree.map(lambda _: rep, state.kl),
                       rng=rep, step=rep)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var[R - V] / Var[R] over valid tokens (1: perfect critic, 0: no better than a constant)."""
  var_r = masked_var(returns, mask, unbiased=False)
  return 1.0 - masked_var(returns - values, mask, unbiased=False) / jnp.maximum(var_r, 1e-8)


@flax.struct.dataclass
class Minibatch:
  """The rows of one optimizer step, with what the losses compare against.

  Attributes:
    rollout: The completions (with the temperature they were sampled at).
    old_logprobs: [B, N] sampling-time log-probs (the sampler's, or the trainer's forward with
      `mismatch.recompute_logprobs`).
    ref_logprobs: [B, N] reference-policy log-probs.
    advantages, returns: [B, N] from the estimator (advantages whitened if configured).
    old_values: [B, N] critic values at sampling time (0 without a critic).
  """
  rollout: Rollout
  old_logprobs: jax.Array
  ref_logprobs: jax.Array
  advantages: jax.Array
  returns: jax.Array
  old_values: jax.Array


def _minibatch_loss(cfg: PPOConfig, state: TrainState, params, mb: Minibatch,
                    kl_coef: jax.Array, totals: dict[str, jax.Array], frozen=None):
  """Policy loss - ent_coef * entropy [+ kl_coef * KL] [+ vf_coef * value loss], one forward
  pass of the policy trunk shared by the log-probs and a shared critic.

  `mb` is a microbatch of a minibatch whose `normalizer_counts` are `totals`: every term, and
  every metric, is scaled by this microbatch's share of the count it is a mean over, so the sums
  over the microbatches are the minibatch's loss and metrics (share 1 for the whole minibatch).
  """
  rollout = mb.rollout
  mask = rollout.completion_mask
  share = jax.tree.map(lambda n, total: n / jnp.maximum(total, 1.0),
                       normalizer_counts(mask), totals)
  per_token = lambda x: share["token"] * x   # scales a token-level mean
  params = lora.join(frozen, params)
  policy = nnx.merge(state.policy_graphdef, params["policy"])
  hidden = completion_hidden(policy, rollout)
  logprobs, entropy = completion_logprobs(policy, rollout, hidden, with_entropy=True)
  if not cfg.ent_coef:
    # Only a metric then: no backward pass through the [B, N, V] softmax for a zero weight.
    entropy = jax.lax.stop_gradient(entropy)
  pg_loss, aux = policy_loss(cfg.policy_loss, logprobs, mb.old_logprobs, mb.advantages, mask)
  pg_loss = share[loss_normalizer(POLICY_LOSSES, cfg.policy_loss.name)] * pg_loss
  entropy = per_token(masked_mean(entropy, mask))
  loss = pg_loss - cfg.ent_coef * entropy
  metrics = {"pg_loss": pg_loss, "entropy": entropy, **jax.tree.map(per_token, aux)}
  if not cfg.kl.in_reward:
    kl = kl_lib.kl_penalty(cfg.kl.estimator, logprobs, mb.ref_logprobs)
    if cfg.kl.loss_average == "sequence":   # mean over sequences of their token means
      kl_loss = share["sequence"] * masked_mean(masked_mean(kl, mask, axis=-1),
                                                jnp.any(mask > 0, axis=-1))
    else:
      kl_loss = per_token(masked_mean(kl, mask))
    loss = loss + kl_coef * kl_loss
    metrics["kl_loss"] = kl_loss
  values = cfg.critic_impl.values(state.value_graphdef, params["value"], rollout, lambda: hidden)
  if values is not None:
    vf_loss, vf_aux = value_loss(cfg.value_loss, values, mb.old_values, mb.returns, mask)
    vf_loss = share[loss_normalizer(VALUE_LOSSES, cfg.value_loss.name)] * vf_loss
    loss = loss + cfg.vf_coef * vf_loss
    metrics.update(value_loss=vf_loss, **jax.tree.map(per_token, vf_aux))
  metrics["loss"] = loss
  return loss, metrics


def ppo_update(cfg: PPOConfig, state: TrainState, scored: Scored,
               frozen: dict | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One PPO phase: advantages, then epochs x minibatches of clipped-surrogate steps.

  Pure; jit it with `cfg` static and the state donated:
  `jax.jit(ppo_update, static_argnums=0, donate_argnums=1)`.
  With `cfg.micro_batch_size`, each minibatch's gradient is accumulated over a `lax.scan` of
  microbatches before its one optimizer update (see PPOConfig). A minibatch whose (accumulated)
  loss or gradient is not finite leaves params and optimizer state unchanged and is counted in
  `nonfinite_steps`.

  Args:
    cfg: PPOConfig.
    state: TrainState.
    scored: output of `collect` (values present iff the critic has them). Its rollout's
      recorded temperature is the one the log-probs are recomputed at.
    frozen: `frozen_params` under LoRA (never donated: the reference reads the same arrays);
      gradients and optimizer steps cover `state.params` only.

  Returns:
    (new state, metrics averaged over all minibatch steps plus batch statistics).
  """
  rollout = scored.rollout
  mask = rollout.completion_mask
  b = mask.shape[0]
  if b % cfg.num_minibatches:
    raise ValueError(f"batch size {b} is not divisible by num_minibatches={cfg.num_minibatches}")
  if (scored.values is None) == cfg.critic_impl.has_values:
    raise ValueError(f"critic={cfg.critic!r} but scored.values is "
                     f"{'missing' if scored.values is None else 'present'}")
  chex.assert_equal_shape([mask, scored.token_rewards, rollout.logprobs])
  advantages, returns = compute_advantages(
      cfg.advantage, AdvantageInputs(token_rewards=scored.token_rewards, values=scored.values,
                                     mask=mask, group_size=cfg.group_size,
                                     baselines=scored.baselines))
  if cfg.whiten_advantages:
    advantages = masked_whiten(advantages, mask)
  old_logprobs = rollout.logprobs
  mm = cfg.mismatch
  if mm.recompute_logprobs or mm.correction != "none":
    if scored.trainer_logprobs is None:
      raise ValueError("mismatch.recompute_logprobs / mismatch.correction need "
                       "scored.trainer_logprobs (filled by collect)")
    chex.assert_equal_shape([mask, scored.trainer_logprobs])
    weights = correction_weights(mm, scored.trainer_logprobs, rollout.logprobs, mask)
    advantages = advantages * weights
    if mm.recompute_logprobs:
      old_logprobs = scored.trainer_logprobs
  batch = Minibatch(
      rollout=rollout, old_logprobs=old_logprobs, ref_logprobs=scored.ref_logprobs,
      advantages=advantages, returns=returns,
      old_values=scored.values if scored.values is not None else jnp.zeros_like(mask))
  kl_coef = state.kl.coef
  mb_size = b // cfg.num_minibatches
  micro = cfg.micro_batch_size or mb_size
  if mb_size % micro:
    raise ValueError(f"micro_batch_size={micro} does not divide the minibatch size {mb_size} "
                     f"(batch size {b} / num_minibatches={cfg.num_minibatches})")
  grad_fn = jax.grad(
      lambda p, mb, totals: _minibatch_loss(cfg, state, p, mb, kl_coef, totals, frozen),
      has_aux=True)

  def minibatch_grad(params, mb):
    """(gradient, metrics) of the minibatch `mb`, summed over its microbatches."""
    totals = normalizer_counts(mb.rollout.completion_mask)
    return microbatch.accumulate(lambda p, m: grad_fn(p, m, totals), params, mb, micro)

  def minibatch_step(carry, mb):
    params, opt_state = carry
    grads, metrics = minibatch_grad(params, mb)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def step(params, opt_state):
      updates, opt_state = state.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A branch, not a select of new against old: both copies of params and optimizer state would
    # be live at once, and the select is another pass over them.
    carry = jax.lax.cond(finite, step, lambda *c: c, params, opt_state)
    return carry, dict(metrics, grad_norm=grad_norm, nonfinite_steps=1.0 - finite)

  def shuffle(x, perm):
    x = x[perm].reshape((cfg.num_minibatches, mb_size) + x.shape[1:])
    # A permutation gather over a batch-sharded array leaves its result replicated: each
    # minibatch's rows go back onto the batch axes (a no-op without a mesh).
    return sharding_lib.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

  def epoch(carry, key):
    perm = jax.random.permutation(key, b)
    shuffled = jax.tree.map(lambda x: shuffle(x, perm), batch)
    return jax.lax.scan(minibatch_step, carry, shuffled)

  keys = jax.random.split(jax.random.fold_in(state.rng, state.step), cfg.ppo_epochs)
  (params, opt_state), per_step = jax.lax.scan(
      epoch, (state.params, state.opt_state), keys)
  metrics = jax.tree.map(jnp.mean, per_step)
  metrics["nonfinite_steps"] = per_step["nonfinite_steps"].sum()
  seq_kl = masked_sum(scored.kl, mask, axis=-1).mean()
  new_kl = kl_lib.update_kl_controller(cfg.kl, state.kl, seq_kl, b)
  if scored.values is not None:
    metrics["explained_variance"] = explained_variance(scored.values, returns, mask)
    metrics["value_mean"] = masked_mean(scored.values, mask)
  if mm.correction != "none":
    metrics["mismatch/weight_mean"] = masked_mean(weights, mask)
  metrics["advantage_mean"] = masked_mean(advantages, mask)
  metrics["return_mean"] = masked_mean(returns, mask)
  new_state = state.replace(params=params, opt_state=opt_state, kl=new_kl, step=state.step + 1)
  return new_state, metrics
