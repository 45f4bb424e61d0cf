"""config_tree: dataclass <-> ConfigDict both ways, and overrides through the real flag parser
(absl FlagValues + ml_collections config_flags, locked config, argv parsed as the mains do)."""

import dataclasses
from typing import Any

import pytest
from absl import flags
from ml_collections import config_flags

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


def _with(tree: dict, path: str, value) -> dict:
  *parents, leaf = path.split(".")
  node = tree
  for p in parents:
    node = node[p]
  node[leaf] = value
  return tree
