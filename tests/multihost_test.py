"""Multi-process runs: `jax.distributed.initialize` from flags or environment, and two processes
on localhost (CPU, gloo collectives, 2 devices each) that train like one process with 4 devices
and write a checkpoint that one process restores."""

import math
import socket

import pytest

from experiments import common

import tiny_ppo


def test_distributed_args_from_flags_then_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert common.distributed_args(None, None, None, environ={}) is None
  assert common.distributed_args(None, None, None, environ=env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  assert common.distributed_args("h:1", 2, 0, environ=env) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
  assert common.distributed_args("h:1", 1, 0, environ={}) is None
  with pytest.raises(ValueError, match="missing --process_id"):
    common.distributed_args("h:1", 2, None, environ={})
  with pytest.raises(ValueError, match="process_id=2, num_processes=2"):
    common.distributed_args("h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two' is not a valid int"):
    common.distributed_args(None, None, None, environ={**env, "JAX_NUM_PROCESSES": "two"})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _assert_close(got: list[dict], want: list[dict]) -> None:
  """Same records up to float32 reduction order (gloo all-reduces sum in another order)."""
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k, v in w.items():
      if isinstance(v, float):
        assert math.isclose(g[k], v, rel_tol=1e-3, abs_tol=1e-5), (w["step"], k, g[k], v)
      else:
        assert g[k] == v, (w["step"], k)


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path,
                                                                       tmp_path_factory):
  inputs = tiny_ppo.write_inputs(tmp_path)
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  multi = str(tmp_path / "multi")
  address = f"localhost:{_free_port()}"
  procs = [tiny_ppo.start(multi, {**inputs, **tiny_ppo.ppo_overrides(2)}, cache,
                          str(tmp_path / f"p{i}.log"), num_devices=2,
                          flags=(f"--coordinator_address={address}", "--num_processes=2",
                                 f"--process_id={i}"))
           for i in range(2)]
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, open(tmp_path / f"p{i}.log").read()[-3000:]
  assert tiny_ppo.checkpoint_steps(multi) == [1, 2]

  single = str(tmp_path / "single")
  ref = tiny_ppo.run(single, {**inputs, **tiny_ppo.ppo_overrides(3)}, cache, num_devices=4)
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = tiny_ppo.stage_metrics(single)
  _assert_close(tiny_ppo.stage_metrics(multi)[:2], want[:2])

  # One process with 4 devices continues the two processes' run from their step-2 checkpoint.
  resumed = tiny_ppo.run(multi, {**inputs, **tiny_ppo.ppo_overrides(3)}, cache, num_devices=4)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming PPO from step 2" in resumed.stderr
  _assert_close(tiny_ppo.stage_metrics(multi), want)
