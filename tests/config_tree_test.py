"""config_tree: dataclass <-> ConfigDict both ways, and overrides through the real flag parser
(absl FlagValues + ml_collections config_flags, locked config, argv parsed as the mains do)."""

import dataclasses
import typing
from typing import Any

import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import default as default_config
from rlhf_jax.config_tree import from_config_dict, to_config_dict


@dataclasses.dataclass(frozen=True)
class Inner:
  rate: float = 0.5
  name: str = "a"
  cap: float | None = None

  def __post_init__(self):
    if self.rate < 0:
      raise ValueError(f"rate must be >= 0, got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Middle:
  inner: Inner = Inner()
  steps: int = 3


@dataclasses.dataclass(frozen=True)
class Toy:
  middle: Middle = Middle()
  flag: bool = False
  whole: float = 1            # an int default of a float field
  shape: tuple[int, ...] = (-1, 1)
  ids: int | tuple[int, ...] | None = None
  pairs: tuple[tuple[str, Any], ...] = ()
  count: int | None = None


def parse(obj, *overrides: str, name: str = "config"):
  """Parses `--config.a.b=c` overrides of `to_config_dict(obj)` as a main's command line would,
  and builds the dataclass back."""
  argv = ["prog", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict(name, to_config_dict(obj), flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return from_config_dict(type(obj), fv[name].value)


@pytest.mark.parametrize("obj", [
    Toy(), Toy(ids=(1, 2), pairs=(("rope_type", "linear"), ("factor", 2.0)), count=4),
    Toy(middle=Middle(Inner(rate=2.0, cap=0.25), steps=7), ids=5, flag=True)])
def test_round_trip(obj):
  assert from_config_dict(type(obj), to_config_dict(obj)) == obj


def test_tree_mirrors_the_dataclasses():
  c = to_config_dict(Toy())
  assert c.middle.inner.rate == 0.5 and c.middle.steps == 3
  assert c.shape == (-1, 1) and isinstance(c.whole, float)
  assert c.get_type("count") is int and c.middle.inner.get_type("cap") is float   # placeholders
  assert c.get_type("ids") is object


def test_every_kind_of_field_from_the_command_line():
  got = parse(Toy(), "--config.middle.inner.rate=0.75", "--config.middle.inner.name=b",
              "--config.middle.inner.cap=0.3", "--config.middle.steps=9", "--config.flag",
              "--config.whole=0.5", "--config.shape=(2,2,2)", "--config.ids=(3,4)",
              "--config.pairs=(('factor',8.0),)", "--config.count=12")
  assert got == Toy(middle=Middle(Inner(rate=0.75, name="b", cap=0.3), steps=9), flag=True,
                    whole=0.5, shape=(2, 2, 2), ids=(3, 4), pairs=(("factor", 8.0),), count=12)
  assert parse(Toy(), "--config.ids=7").ids == 7
  assert parse(Toy(ids=7), "--config.ids=None").ids is None
  assert parse(Toy(flag=True), "--noconfig.flag").flag is False


def test_unknown_key_at_any_depth_names_its_path():
  for path in ("bogus", "middle.bogus", "middle.inner.bogus"):
    with pytest.raises(ValueError, match=rf"^unknown config field --config\.{path}$"):
      from_config_dict(Toy, _with(to_config_dict(Toy()).to_dict(), path, 1))


def test_wrong_type_names_its_path():
  with pytest.raises(ValueError, match=r"--config\.middle\.inner\.rate must be float, got 'x'"):
    from_config_dict(Toy, {"middle": {"inner": {"rate": "x"}}})
  with pytest.raises(ValueError, match=r"--config\.middle\.steps must be int, got 2\.5"):
    from_config_dict(Toy, {"middle": {"steps": 2.5}})
  with pytest.raises(ValueError, match=r"--config\.flag must be bool, got 1"):
    from_config_dict(Toy, {"flag": 1})
  with pytest.raises(ValueError, match=r"--config\.ids must be .*, got \(1, 'a'\)"):
    from_config_dict(Toy, {"ids": (1, "a")})
  with pytest.raises(ValueError, match=r"--config\.ids must be .*, got 'abc'"):
    parse(Toy(), "--config.ids=abc")
  with pytest.raises(flags.IllegalFlagValueError, match="config.middle.steps"):
    parse(Toy(), "--config.middle.steps=abc")


def test_missing_keys_keep_defaults_and_post_init_runs():
  assert from_config_dict(Toy, {"middle": {"steps": 4}}) == Toy(middle=Middle(steps=4))
  with pytest.raises(ValueError, match="rate must be >= 0"):
    parse(Toy(), "--config.middle.inner.rate=-1")


def test_fields_derived_in_post_init_stay_derived_in_the_tree():
  """DecoderConfig's family switches are None defaults filled in from model_type: the tree keeps
  them unset, so changing model_type on the command line brings that family's switches, while
  a switch given explicitly wins."""
  from rlhf_jax.models import DecoderConfig
  tree = to_config_dict(DecoderConfig())
  assert tree.norm is None and tree.get_type("qk_norm") is bool
  assert parse(DecoderConfig(), "--config.model_type=gpt2") == DecoderConfig(model_type="gpt2")
  assert parse(DecoderConfig(), "--config.model_type=gpt2").positions == "learned"
  assert parse(DecoderConfig(), "--config.model_type=qwen3").qk_norm is True
  assert parse(DecoderConfig(), "--config.model_type=qwen3", "--noconfig.qk_norm").qk_norm is False
  assert parse(DecoderConfig(norm="layernorm"), "--config.model_type=qwen2").norm == "layernorm"
  assert from_config_dict(DecoderConfig, to_config_dict(DecoderConfig())) == DecoderConfig()


def test_a_rejected_value_names_its_dataclass_path():
  with pytest.raises(ValueError, match=r"^--config\.middle\.inner: rate must be >= 0, got -1"):
    from_config_dict(Toy, {"middle": {"inner": {"rate": -1.0}}})


def _with(tree: dict, path: str, value) -> dict:
  *parents, leaf = path.split(".")
  node = tree
  for p in parents:
    node = node[p]
  node[leaf] = value
  return tree


# --- the experiment config: every field of every stage from the command line -------------------

# Values for fields whose type alone does not give a valid non-default one (names, dtypes, ids
# that must differ); every other leaf gets one from its type (see `_changed`).
EXPLICIT = {
    "task.name": "", "mesh_shape": (2, 2, 2), "model.model_type": "qwen2",
    "model.norm": "layernorm", "model.activation": "gelu", "model.positions": "learned",
    "model.rope_scaling": (("rope_type", "linear"), ("factor", 2.0)),
    "model.eos_token_id": (5, 6), "model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
    "ppo.sampling.eos_token_id": 3,
    "ppo.sampling.pad_token_id": 4, "ppo.policy_loss.name": "grpo",
    "ppo.value_loss.name": "mse", "ppo.advantage.estimator": "rloo", "ppo.kl.estimator": "k3",
    "ppo.kl.controller": "adaptive", "ppo.critic": "shared", "sft.optim.schedule": "linear",
    "reward.optim.schedule": "linear", "ppo.optim.schedule": "linear",
    "ppo.frozen_param_dtype": "bfloat16", "model.remat": "full", "ppo.micro_batch_size": 8,
    "sft.micro_batch_size": 16, "reward.micro_batch_size": 16,
    "method": "dpo", "dpo.loss.name": "cdpo", "dpo.sampling.eos_token_id": 3,
    "dpo.sampling.pad_token_id": 4, "dpo.optim.schedule": "linear", "dpo.micro_batch_size": 16,
    "ppo.rewards.terms": "reward_model+0.5*format", "ppo.mismatch.correction": "tis",
    "ppo.kl.loss_average": "sequence",
    "ppo.lora.target_modules": r"attn\.(q|v)",
    "ppo.lora.modules_to_save": "lm_head",
}


def _leaves(obj, prefix: str = ""):
  """(dotted path, value) of every non-dataclass field, depth first."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      yield from _leaves(value, f"{prefix}{f.name}.")
    else:
      yield f"{prefix}{f.name}", value


def _changed(path: str, value, hint):
  """A valid value other than `value` for the field `path` of type `hint`."""
  if path in EXPLICIT:
    return EXPLICIT[path]
  base = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
  if base is bool:
    return not value
  if base is int:
    return 2 * value if value else 7            # doubles keep divisibility constraints
  if base is float:
    return value / 2 if value else 0.25         # inside [0, 1] whenever the default is
  if base is str:
    return f"{value}_x" if value else "/some/path"
  raise AssertionError(f"no changed value for {path}: {hint} (add it to EXPLICIT)")


def _hint(cls, path: str):
  *parents, leaf = path.split(".")
  for p in parents:
    cls = typing.get_type_hints(cls)[p]
  return typing.get_type_hints(cls)[leaf]


def _flag(path: str, value) -> str:
  if isinstance(value, bool):
    return f"--{'' if value else 'no'}config.{path}"
  return f"--config.{path}={value!r}" if isinstance(value, tuple) else f"--config.{path}={value}"


def test_every_experiment_field_is_set_from_its_flag():
  """Every leaf of `ExperimentConfig` (all stages, nested at any depth), changed at once through
  `--config.a.b=c` on the real flag parser, reads back in the built dataclasses."""
  from experiments import common
  from rlhf_jax.pipeline import ExperimentConfig
  base = from_config_dict(ExperimentConfig, default_config.get_config("default"))
  want = {path: _changed(path, value, _hint(ExperimentConfig, path))
          for path, value in _leaves(base)}
  assert len(want) > 100 and all(want[p] != v for p, v in _leaves(base)), "a value did not change"
  argv = ["prog", f"--config={common.DEFAULT_CONFIG}", *(_flag(p, v) for p, v in want.items())]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  got = dict(_leaves(from_config_dict(ExperimentConfig, fv.config)))
  assert got.keys() == want.keys()
  wrong = {p: (got[p], v) for p, v in want.items() if got[p] != v}
  assert not wrong, wrong


def test_variants_build():
  from rlhf_jax.pipeline import ExperimentConfig
  smoke, grpo = (from_config_dict(ExperimentConfig, default_config.get_config(v))
                 for v in ("smoke", "grpo"))
  assert smoke.ppo.max_steps == 3 and smoke.task.num_sft == 256
  assert grpo.ppo.advantage.estimator == "grpo" and grpo.ppo.critic == "none"
  math = from_config_dict(ExperimentConfig, default_config.get_config("grpo_math"))
  assert math.task.name == "arithmetic" and math.ppo.rewards.terms == "arithmetic"
  assert math.ppo.group_size > 1 and not math.ppo.rewards.uses_reward_model
  lora = from_config_dict(ExperimentConfig, default_config.get_config("lora"))
  assert lora.ppo.lora.enabled and lora.ppo.lora.modules_to_save == "lm_head"
  with pytest.raises(ValueError, match="unknown config variant 'nosuch'"):
    default_config.get_config("nosuch")
