"""Typed config dataclasses <-> ml_collections ConfigDicts, one generic conversion each way.

The command line edits a ConfigDict (`--config.ppo.kl.init_coef=0.2`, parsed by
`ml_collections.config_flags`), the code reads frozen dataclasses. `to_config_dict` mirrors a
dataclass instance as a ConfigDict tree with the same field names, so every field has a flag, and
`from_config_dict` builds the dataclasses back, checking names and types against the type hints
(each dataclass's own `__post_init__` validates the values).

How a field's type hint shapes its ConfigDict entry, so that config_flags picks a parser for it:
  nested dataclass       -> nested ConfigDict (`--config.a.b=...` reaches its fields)
  `T | None` set to None -> `placeholder(T)`: typed, so `--config.a.x=0.3` parses as T (a
                            set value cannot be reset to None from the command line)
  `A | B [| None]`, Any  -> a FieldReference of type object: the flag is read as a Python
                            literal (`--config.model.eos_token_id='(2, 3)'`, `=2`, `=None`) and
                            checked against the hint here
  `float` holding an int -> the float, so a fractional override parses
  a None default that     -> None (its placeholder): the value stays derived, so it follows
  `__post_init__` filled     the fields it comes from (`--config.model.model_type=gpt2` brings
  in                         GPT-2's norm, positions, ...); an override still wins
  anything else          -> the value itself (tuples stay tuples: `--config.mesh_shape='(2,2,2)'`)
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

_NONE = type(None)


def _arms(hint) -> tuple[list, bool]:
  """The non-None members of a (possibly Optional) union, and whether None is allowed."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    return [a for a in args if a is not _NONE], _NONE in args
  return ([], True) if hint is _NONE else ([hint], False)


def _hints(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def to_config_dict(obj) -> config_dict.ConfigDict:
  """The ConfigDict tree mirroring a dataclass instance (see the module docstring)."""
  if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
    raise TypeError(f"to_config_dict needs a dataclass instance, got {obj!r}")
  c = config_dict.ConfigDict()
  defaults = {f.name: f.default for f in dataclasses.fields(obj)}
  for name, hint in _hints(type(obj)).items():
    value = getattr(obj, name)
    if defaults[name] is None and value is not None and _derived(obj, name):
      value = None
    c[name] = _to_entry(value, hint, f"{type(obj).__name__}.{name}")
  return c


def _derived(obj, name: str) -> bool:
  """Whether field `name` of `obj` holds what its __post_init__ derives when it is None."""
  try:
    return dataclasses.replace(obj, **{name: None}) == obj
  except (ValueError, TypeError):
    return False


def _to_entry(value, hint, where: str):
  if dataclasses.is_dataclass(value):
    return to_config_dict(value)
  arms, _ = _arms(hint)
  if len(arms) != 1 or arms[0] is Any:
    return config_dict.FieldReference(value, field_type=object)
  base = typing.get_origin(arms[0]) or arms[0]
  if dataclasses.is_dataclass(base):
    raise TypeError(f"{where}: a dataclass field that is None has no fields to set; "
                    "give it a default instance")
  if value is None:
    return config_dict.placeholder(base)
  if base is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def from_config_dict(cls, cd: Mapping, path: str = "--config"):
  """The `cls` instance a ConfigDict (or dict) tree describes; fields it lacks keep their
  defaults. Raises ValueError naming the dotted path (`--config.ppo.kl.bogus`) of an unknown key
  or a value of the wrong type, at any depth, and prefixes a value `cls.__post_init__` rejects
  with the path of its dataclass (`--config.sft.optim: learning_rate must be ...`)."""
  hints = _hints(cls)
  kwargs = {}
  for name in cd.keys():
    where = f"{path}.{name}"
    if name not in hints:
      raise ValueError(f"unknown config field {where}")
    kwargs[name] = _from_entry(cd[name], hints[name], where)
  try:
    return cls(**kwargs)
  except ValueError as e:
    if isinstance(e, KeyError):   # a registry's unknown name: str() would quote the message
      raise ValueError(f"{path}: {e.args[0]}") from None
    raise type(e)(f"{path}: {e}") from None


class _Mismatch(Exception):
  """`value` is not of the type tried (caught to try the next arm of a union)."""


def _from_entry(value, hint, where: str):
  try:
    return _convert(value, hint, where)
  except _Mismatch:
    raise ValueError(f"{where} must be {_type_name(hint)}, got {value!r}") from None


def _convert(value, hint, where: str):
  """`value` as type `hint` (a nested dataclass built from its ConfigDict), or _Mismatch."""
  arms, none_ok = _arms(hint)
  if len(arms) != 1 or none_ok:
    if value is None and none_ok:
      return None
    for arm in arms:
      try:
        return _convert(value, arm, where)
      except _Mismatch:
        pass
    raise _Mismatch
  origin = typing.get_origin(hint) or hint
  if hint is Any or hint is object:
    return value
  if dataclasses.is_dataclass(hint):
    if isinstance(value, hint):
      return value
    if isinstance(value, Mapping | config_dict.ConfigDict):
      return from_config_dict(hint, value, where)
    raise _Mismatch
  if origin is tuple:
    if not isinstance(value, tuple | list):
      raise _Mismatch
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      args = (args[0],) * len(value)
    elif not args:
      args = (Any,) * len(value)
    elif len(args) != len(value):
      raise _Mismatch
    return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin is bool:
    ok = isinstance(value, bool)
  elif origin is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif origin is float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(origin, type):
    ok = isinstance(value, origin)
  else:
    raise TypeError(f"{where}: config fields of type {hint} are not supported")
  if not ok:
    raise _Mismatch
  return value


def _type_name(hint) -> str:
  if isinstance(hint, type) and not typing.get_args(hint):
    return "None" if hint is _NONE else hint.__name__
  return str(hint).replace("typing.", "")
