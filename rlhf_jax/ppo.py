"""`ppo_update` and the explicit training state it threads.

One call = one PPO optimisation phase on a scored batch (Schulman et al. 2017; the RLHF recipe of
Ziegler et al. 2019 / Ouyang et al. 2022): advantages from the registered estimator, whitening over
valid tokens, then `lax.scan` over epochs x shuffled minibatches with one optimizer step per
minibatch, and the KL controller step. Losses and estimators are looked up by name in their
registries, so a research fork adds one with a decorator and a config string.
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
from rlhf_jax.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, AdvantageInputs, compute_advantages
from rlhf_jax.losses import (POLICY_LOSSES, VALUE_LOSSES, PolicyLossConfig, ValueLossConfig,
                             entropy_from_logits, policy_loss, token_logprobs, value_loss)
from rlhf_jax.masked import masked_mean, masked_var, masked_whiten
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.rollout import Rollout
from rlhf_jax.score import Scored, completion_hidden

CRITICS = ("separate", "shared", "none")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyperparameters of the policy-optimisation phase.

  Attributes:
    policy_loss: Name and clipping of the policy loss (registry `POLICY_LOSSES`).
    value_loss: Name and clipping of the value loss (registry `VALUE_LOSSES`).
    advantage: Estimator (registry `ADVANTAGE_ESTIMATORS`), gamma, lambda, group size.
    kl: KL estimator, placement (reward or loss) and controller.
    critic: "separate" (a value model of its own), "shared" (a value head on the policy trunk:
      less work, one backbone) or "none" (critic-free estimators such as grpo/rloo).
    ppo_epochs: Passes over the batch.
    num_minibatches: Minibatches per pass; one optimizer step each.
    vf_coef: Weight of the value loss.
    ent_coef: Weight of the entropy bonus.
    whiten_advantages: Whiten advantages over the valid tokens of the batch.
    temperature: Sampling temperature; log-probs are recomputed from logits / T.
  """
  policy_loss: PolicyLossConfig = PolicyLossConfig()
  value_loss: ValueLossConfig = ValueLossConfig()
  advantage: AdvantageConfig = AdvantageConfig()
  kl: kl_lib.KLConfig = kl_lib.KLConfig()
  critic: str = "separate"
  ppo_epochs: int = 4
  num_minibatches: int = 1
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  whiten_advantages: bool = True
  temperature: float = 1.0

  def __post_init__(self):
    if self.critic not in CRITICS:
      raise ValueError(f"critic must be one of {CRITICS}, got {self.critic!r}")
    POLICY_LOSSES.get(self.policy_loss.name)
    VALUE_LOSSES.get(self.value_loss.name)
    ADVANTAGE_ESTIMATORS.get(self.advantage.estimator)
    if self.advantage.estimator == "gae" and self.critic == "none":
      raise ValueError("advantage estimator 'gae' needs a critic (critic='separate' or 'shared')")
    if self.ppo_epochs < 1 or self.num_minibatches < 1:
      raise ValueError("ppo_epochs and num_minibatches must be >= 1")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during RL training, as one pytree.

  Attributes:
    params: {"policy": State, "value": State | {"head": array} | None}.
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


def init_train_state(cfg: PPOConfig, policy: nnx.Module, tx: optax.GradientTransformation,
                     rng: jax.Array, value_model: nnx.Module | None = None) -> TrainState:
  """Builds the train state from a policy CausalLM and, for critic="separate", a ScalarModel.

  A shared critic gets a zero-initialised value head on the policy's final hidden states.
  """
  policy_graphdef, policy_params = nnx.split(policy)
  value_graphdef, value_params = None, None
  if cfg.critic == "separate":
    if value_model is None:
      raise ValueError("critic='separate' needs a value model (a ScalarModel)")
    value_graphdef, value_params = nnx.split(value_model)
  elif cfg.critic == "shared":
    value_params = {"head": jnp.zeros((policy.cfg.hidden_size,), jnp.float32)}
  params = {"policy": policy_params, "value": value_params}
  return TrainState(params=params, opt_state=tx.init(params),
                    kl=kl_lib.init_kl_controller(cfg.kl), rng=rng,
                    step=jnp.zeros((), jnp.int32), policy_graphdef=policy_graphdef,
                    value_graphdef=value_graphdef, tx=tx)


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


def _policy_outputs(state: TrainState, params, rollout: Rollout, critic: str, temperature: float):
  """(logits / T [B,N,V], values [B,N] or None) in one pass over the shared trunk when possible."""
  policy = nnx.merge(state.policy_graphdef, params["policy"])
  hidden = completion_hidden(policy, rollout)
  logits = policy.logits(hidden) / temperature
  if critic == "shared":
    values = (hidden.astype(jnp.float32) @ params["value"]["head"])
  elif critic == "separate":
    value_model = nnx.merge(state.value_graphdef, params["value"])
    values = value_model.apply_head(completion_hidden(value_model, rollout))
  else:
    values = None
  return logits, values


def critic_values(cfg: PPOConfig, state: TrainState, rollout: Rollout) -> jax.Array | None:
  """Values V(s_t) [B, N] of the current critic at the positions predicting each completion token
  (0 on padding), or None without a critic."""
  if cfg.critic == "none":
    return None
  if cfg.critic == "shared":
    policy = state.policy
    hidden = completion_hidden(policy, rollout)
    values = hidden.astype(jnp.float32) @ state.params["value"]["head"]
  else:
    model = nnx.merge(state.value_graphdef, state.params["value"])
    values = model.apply_head(completion_hidden(model, rollout))
  return values * rollout.completion_mask


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var[R - V] / Var[R] over valid tokens (1: perfect critic, 0: no better than a constant)."""
  var_r = masked_var(returns, mask, unbiased=False)
  return 1.0 - masked_var(returns - values, mask, unbiased=False) / jnp.maximum(var_r, 1e-8)


def _minibatch_loss(cfg: PPOConfig, state: TrainState, params, mb: dict[str, jax.Array]):
  rollout = mb["rollout"]
  mask = rollout.completion_mask
  logits, values = _policy_outputs(state, params, rollout, cfg.critic, cfg.temperature)
  logprobs = token_logprobs(logits, rollout.completion_ids)
  pg_loss, aux = policy_loss(cfg.policy_loss, logprobs, mb["old_logprobs"], mb["advantages"], mask)
  entropy = masked_mean(entropy_from_logits(logits), mask)
  loss = pg_loss - cfg.ent_coef * entropy
  metrics = {"pg_loss": pg_loss, "entropy": entropy, **aux}
  if not cfg.kl.in_reward:
    kl_loss = masked_mean(kl_lib.kl_penalty(cfg.kl.estimator, logprobs, mb["ref_logprobs"]), mask)
    loss = loss + mb["kl_coef"] * kl_loss
    metrics["kl_loss"] = kl_loss
  if values is not None:
    vf_loss, vf_aux = value_loss(cfg.value_loss, values, mb["old_values"], mb["returns"], mask)
    loss = loss + cfg.vf_coef * vf_loss
    metrics.update(value_loss=vf_loss, **vf_aux)
  metrics["loss"] = loss
  return loss, metrics


def ppo_update(cfg: PPOConfig, state: TrainState,
               scored: Scored) -> tuple[TrainState, dict[str, jax.Array]]:
  """One PPO phase: advantages, then epochs x minibatches of clipped-surrogate steps.

  Pure; jit it with `cfg` static and the state donated:
  `jax.jit(ppo_update, static_argnums=0, donate_argnums=1)`.
  A minibatch whose loss or gradient is not finite leaves params and optimizer state unchanged
  and is counted in `nonfinite_steps`.

  Args:
    cfg: PPOConfig.
    state: TrainState.
    scored: output of `score` (with `values` from `critic_values` when there is a critic).

  Returns:
    (new state, metrics averaged over all minibatch steps plus batch statistics).
  """
  rollout = scored.rollout
  mask = rollout.completion_mask
  b = mask.shape[0]
  if b % cfg.num_minibatches:
    raise ValueError(f"batch size {b} is not divisible by num_minibatches={cfg.num_minibatches}")
  if (scored.values is None) != (cfg.critic == "none"):
    raise ValueError(f"critic={cfg.critic!r} but scored.values is "
                     f"{'missing' if scored.values is None else 'present'}")
  chex.assert_equal_shape([mask, scored.token_rewards, rollout.logprobs])
  advantages, returns = compute_advantages(
      cfg.advantage, AdvantageInputs(token_rewards=scored.token_rewards, values=scored.values,
                                     mask=mask))
  if cfg.whiten_advantages:
    advantages = masked_whiten(advantages, mask)
  batch = {
      "rollout": rollout, "old_logprobs": rollout.logprobs, "ref_logprobs": scored.ref_logprobs,
      "advantages": advantages, "returns": returns,
      "old_values": scored.values if scored.values is not None else jnp.zeros_like(mask),
  }
  kl_coef = state.kl.coef
  mb_size = b // cfg.num_minibatches
  grad_fn = jax.grad(lambda p, mb: _minibatch_loss(cfg, state, p, mb), has_aux=True)

  def minibatch_step(carry, mb):
    params, opt_state = carry
    grads, metrics = grad_fn(params, dict(mb, kl_coef=kl_coef))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def step(params, opt_state):
      updates, opt_state = state.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A branch, not a select of new against old: both copies of params and optimizer state would
    # be live at once, and the select is another pass over them.
    carry = jax.lax.cond(finite, step, lambda *c: c, params, opt_state)
    return carry, dict(metrics, grad_norm=grad_norm, nonfinite_steps=1.0 - finite)

  def epoch(carry, key):
    perm = jax.random.permutation(key, b)
    shuffled = jax.tree.map(
        lambda x: x[perm].reshape((cfg.num_minibatches, mb_size) + x.shape[1:]), batch)
    return jax.lax.scan(minibatch_step, carry, shuffled)

  keys = jax.random.split(jax.random.fold_in(state.rng, state.step), cfg.ppo_epochs)
  (params, opt_state), per_step = jax.lax.scan(
      epoch, (state.params, state.opt_state), keys)
  metrics = jax.tree.map(jnp.mean, per_step)
  metrics["nonfinite_steps"] = per_step["nonfinite_steps"].sum()
  seq_kl = (scored.kl * mask).sum(-1).mean()
  new_kl = kl_lib.update_kl_controller(cfg.kl, state.kl, seq_kl, b)
  if scored.values is not None:
    metrics["explained_variance"] = explained_variance(scored.values, returns, mask)
    metrics["value_mean"] = masked_mean(scored.values, mask)
  metrics["advantage_mean"] = masked_mean(advantages, mask)
  metrics["return_mean"] = masked_mean(returns, mask)
  new_state = state.replace(params=params, opt_state=opt_state, kl=new_kl, step=state.step + 1)
  return new_state, metrics
