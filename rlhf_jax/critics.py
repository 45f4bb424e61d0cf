"""Critics: where the value estimates V(s_t) of PPO come from, selectable by name.

Three are registered:
  * "separate": a value model of its own (a `ScalarModel`, initialised from the reward model as in
    the N implementation details of RLHF, Huang et al. 2024), trained beside the policy;
  * "shared": a zero-initialised linear value head on the policy's final hidden states (one
    backbone, less work; the head's gradient flows into the policy trunk);
  * "none": no values, for critic-free estimators (grpo, rloo, reinforce++).

A critic is a small object with `init` (its trainable parameters) and `values`. A fork registers
its own with `@register_critic("name")` on a class (or `CRITICS.register("name")(instance)`) and
selects it with `PPOConfig.critic`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.registry import Registry
from rlhf_jax.rollout import Rollout, completion_hidden


class Critic(Protocol):
  """What `ppo_update` and `collect` need of a critic."""

  has_values: bool          # False: `values` returns None (critic-free estimators)
  needs_value_model: bool   # True: `init` takes a ScalarModel

  def init(self, policy: nnx.Module,
           value_model: nnx.Module | None) -> tuple[nnx.GraphDef | None, Any]:
    """(static graphdef or None, trainable params or None) of the critic."""

  def values(self, graphdef: nnx.GraphDef | None, params: Any, rollout: Rollout,
             policy_hidden: Callable[[], jax.Array]) -> jax.Array | None:
    """V(s_t) [B, N] float32 at the positions predicting each completion token, 0 on padding.

    `policy_hidden()` gives the policy's `completion_hidden` for critics that read it; callers
    that already have it pass it back without a second forward pass.
    """


CRITICS: Registry[Critic] = Registry("critic")


def register_critic(name: str):
  """Class decorator: registers an instance of the decorated class under `name`."""
  def decorate(cls):
    CRITICS.register(name)(cls())
    return cls
  return decorate


def _masked(values: jax.Array, rollout: Rollout) -> jax.Array:
  return jnp.where(rollout.completion_mask > 0, values, 0.0)


@register_critic("separate")
@dataclasses.dataclass(frozen=True)
class SeparateCritic:
  """A ScalarModel of its own, read at every completion position."""
  has_values = True
  needs_value_model = True

  def init(self, policy, value_model):
    del policy
    if value_model is None:
      raise ValueError("critic='separate' needs a value model (a ScalarModel)")
    return nnx.split(value_model)

  def values(self, graphdef, params, rollout, policy_hidden):
    del policy_hidden
    model = nnx.merge(graphdef, params)
    return _masked(model.apply_head(completion_hidden(model, rollout)), rollout)


@register_critic("shared")
@dataclasses.dataclass(frozen=True)
class SharedCritic:
  """V = h_t . w on the policy's final hidden states h_t, w zero-initialised."""
  has_values = True
  needs_value_model = False

  def init(self, policy, value_model):
    del value_model
    return None, {"head": jnp.zeros((policy.cfg.hidden_size,), jnp.float32)}

  def values(self, graphdef, params, rollout, policy_hidden):
    del graphdef
    return _masked(policy_hidden().astype(jnp.float32) @ params["head"], rollout)


@register_critic("none")
@dataclasses.dataclass(frozen=True)
class NoCritic:
  """No value estimates (group-relative and REINFORCE-style estimators)."""
  has_values = False
  needs_value_model = False

  def init(self, policy, value_model):
    del policy, value_model
    return None, None

  def values(self, graphdef, params, rollout, policy_hidden):
    del graphdef, params, rollout, policy_hidden
    return None
