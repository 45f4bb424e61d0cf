"""Test setup: 8 fake CPU devices so every test can build 1-device and 8-device meshes."""

import os

# Must run before JAX initialises its backends. The tests compile hundreds of small programs, and
# LLVM's optimisation of their kernels costs more time than it saves when they run: level 0
# (the stage processes they start get the same flags, `tiny_ppo.env`).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

import tiny_ppo  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """Every test compiles through one persistent cache, shared by both xdist workers and the
  subprocesses the tests start: the many trainers built on the same tiny shapes compile each
  program once, as a restarted process would, and the same executables run, so results stay
  bitwise comparable. (A read that races another process's write fails its deserialization and
  recompiles.)"""
  for k, v in {"jax_compilation_cache_dir": tiny_ppo.cache_dir(tmp_path_factory),
               "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0}.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield
