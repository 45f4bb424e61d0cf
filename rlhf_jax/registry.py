"""Name -> function registries, so a config string picks an implementation.

A research fork adds a variant without touching library code:

  @POLICY_LOSSES.register("my_loss")
  def my_loss(cfg, logprobs, old_logprobs, advantages, mask): ...

and selects it with `PolicyLossConfig(name="my_loss")`. Lookups happen at trace time (the name is a
static Python string), so a registry never appears inside jitted code.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
  """A name that is not registered; the message lists the registered names."""

  def __str__(self) -> str:
    # KeyError.__str__ would repr() the message and wrap it in quotes.
    return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
  """A named mapping from strings to implementations, filled with a decorator."""

  def __init__(self, kind: str):
    """Creates an empty registry.

    Args:
      kind: What the entries are, e.g. "policy loss"; used in error messages.
    """
    self._kind = kind
    self._entries: dict[str, T] = {}

  @property
  def kind(self) -> str:
    return self._kind

  def register(self, name: str) -> Callable[[T], T]:
    """Returns a decorator that stores its argument under `name` and returns it unchanged.

    Raises:
      ValueError: if `name` is already registered (two variants silently sharing a name would make
        a config string ambiguous).
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self._kind} name must be a non-empty string, got {name!r}")

    def decorator(entry: T) -> T:
      if name in self._entries:
        raise ValueError(
            f"{self._kind} {name!r} is already registered (to {self._entries[name]!r})")
      self._entries[name] = entry
      return entry

    return decorator

  def get(self, name: str) -> T:
    """Returns the entry registered under `name`.

    Raises:
      UnknownNameError: (a KeyError and a ValueError) listing the registered names.
    """
    try:
      return self._entries[name]
    except (KeyError, TypeError):
      raise UnknownNameError(
          f"unknown {self._kind} {name!r}; registered: {', '.join(self.names()) or '(none)'}"
      ) from None

  def names(self) -> tuple[str, ...]:
    """Registered names, sorted."""
    return tuple(sorted(self._entries))

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self._kind!r}, names={list(self.names())})"
