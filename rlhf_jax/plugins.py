"""Plugins: modules a run imports before its config is built, so a research fork registers a
policy loss, an advantage estimator, a critic, a reward, ... with a decorator in its own module
and picks it by name from the command line, without touching the trainer:

  python -m experiments.rlhf --workdir=w --config.plugins=my_fork.losses,my_fork.rewards \
      --config.ppo.policy_loss.name=my_loss --config.ppo.rewards.terms=reward_model+my_reward

The config's dataclasses check registered names in `__post_init__`, so the plugins must be
imported first: `build_config` does that for the experiment mains.
"""

import importlib
from collections.abc import Mapping
from types import ModuleType

from rlhf_jax.config_tree import from_config_dict


def plugin_names(spec: str) -> list[str]:
  """The module names of a comma-separated `spec` ("a.b, c" -> ["a.b", "c"]); "" -> []."""
  if not isinstance(spec, str):
    raise ValueError(f"--config.plugins must be a comma-separated string, got {spec!r}")
  return [name.strip() for name in spec.split(",") if name.strip()]


def import_plugins(spec: str) -> list[ModuleType]:
  """Imports the modules of `spec` (comma-separated dotted names), in order.

  Raises:
    ValueError: naming the plugin whose import failed and why (the module is missing or raised).
  """
  modules = []
  for name in plugin_names(spec):
    try:
      modules.append(importlib.import_module(name))
    except Exception as e:   # any import-time failure of the user's module is bad input
      raise ValueError(f"plugin {name!r} could not be imported: {type(e).__name__}: {e}") from e
  return modules


def build_config(cls, cd: Mapping):
  """`from_config_dict(cls, cd)` after importing the plugins `cd["plugins"]` names, so the names
  they register are valid when the dataclasses check them."""
  import_plugins(cd.get("plugins", ""))
  return from_config_dict(cls, cd)
