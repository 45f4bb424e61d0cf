"""Tests for rlhf_jax.registry."""

import pytest

from rlhf_jax.registry import Registry, UnknownNameError


def test_register_returns_function_and_get_fetches_it():
  reg = Registry("widget")

  @reg.register("double")
  def double(x):
    return 2 * x

  assert double(3) == 6  # The decorator hands back the function itself.
  assert reg.get("double") is double
  assert "double" in reg
  assert "triple" not in reg
  assert len(reg) == 1


def test_names_sorted():
  reg = Registry("widget")
  for name in ("b", "c", "a"):
    reg.register(name)(lambda: None)
  assert reg.names() == ("a", "b", "c")
  assert list(reg) == ["a", "b", "c"]


def test_duplicate_name_raises():
  reg = Registry("widget")
  reg.register("x")(lambda: 1)
  with pytest.raises(ValueError, match="widget 'x' is already registered"):
    reg.register("x")(lambda: 2)
  assert reg.get("x")() == 1  # The first registration survives.


def test_unknown_name_lists_registered_names():
  reg = Registry("widget")
  reg.register("beta")(lambda: None)
  reg.register("alpha")(lambda: None)
  with pytest.raises(UnknownNameError) as err:
    reg.get("gamma")
  assert isinstance(err.value, KeyError)
  assert isinstance(err.value, ValueError)
  # No KeyError-style quoting around the message.
  assert str(err.value) == "unknown widget 'gamma'; registered: alpha, beta"


def test_unknown_name_in_empty_and_unhashable_lookup():
  reg = Registry("widget")
  with pytest.raises(KeyError, match=r"registered: \(none\)"):
    reg.get("a")
  with pytest.raises(ValueError, match="unknown widget"):
    reg.get(["not", "hashable"])


@pytest.mark.parametrize("bad", ["", None, 3])
def test_invalid_name_rejected(bad):
  with pytest.raises(ValueError, match="non-empty string"):
    Registry("widget").register(bad)
