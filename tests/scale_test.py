"""bench/scale.py and bench/hlo_collectives.py: collectives parsed from compiled HLO with known
sizes, and the tool's programs compiled on a narrow model with abstract sharded inputs."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def hlo():
  return _load("hlo_collectives")


@pytest.fixture(scope="module")
def scale():
  return _load("scale")


def _mesh():
  return sharding.make_mesh((8,), axes=("x",), devices=jax.devices()[:8])


def test_collectives_of_a_hand_made_program(hlo):
  """Every kind once, each with sizes worked out by hand: rows [4, 16] f32 per device (256 B)
  of a [32, 16] array, a psum in a 3-step scan."""
  def body(a):
    gathered = jax.lax.all_gather(a, "x", tiled=True)
    c, _ = jax.lax.scan(lambda c, _: (0.5 * c + jax.lax.psum(c, "x"), None), a, None, length=3)
    scattered = jax.lax.psum_scatter(gathered, "x", tiled=True)
    permuted = jax.lax.ppermute(a, "x", [(i, (i + 1) % 8) for i in range(8)])
    swapped = jax.lax.all_to_all(a, "x", 1, 1, tiled=True)
    return gathered[:4] + c + scattered + permuted + swapped

  mesh = _mesh()
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  arg = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  res = hlo.measure(fn, arg, num_devices=8, batch_sizes=(32,))
  ops = {o["kind"]: o for o in res["collectives"]["ops"]}
  assert sorted(ops) == sorted(hlo.KINDS)
  assert all(o["group"] == 8 for o in ops.values())
  share = 7 / 8
  expected = {  # kind: (operand bytes, result bytes, wire bytes, times)
      "all-reduce": (256, 256, 2 * 256 * share, 3),
      "all-gather": (256, 2048, 2048 * share, 1),
      "reduce-scatter": (2048, 256, 2048 * share, 1),
      "all-to-all": (256, 256, 256 * share, 1),
      "collective-permute": (256, 256, 256, 1),
  }
  for kind, (operand, result, wire, times) in expected.items():
    o = ops[kind]
    assert (o["operand_bytes"], o["result_bytes"], o["times"]) == (operand, result, times), kind
    assert o["wire_bytes"] == pytest.approx(wire), kind
  # Only the all-gather carries the global 32 rows.
  assert [o["kind"] for o in ops.values() if o["global_batch"]] == ["all-gather"]
  scaled, per_text = res["collectives"]["scaled"], res["collectives"]["per_text"]
  assert (per_text["all-reduce"]["count"], scaled["all-reduce"]["count"]) == (1, 3)
  assert scaled["all-reduce"]["wire_bytes"] == pytest.approx(3 * 2 * 256 * share)
  assert res["collectives"]["unknown_trip_loops"] == 0
  assert res["memory"]["argument"] == 256 and res["per_device_bytes"] > 0


def test_loop_without_trip_count_is_scaled_by_the_bound(hlo):
  def body(a):
    def step(carry):
      i, c = carry
      return i + 1, 0.5 * c + jax.lax.psum(c, "x")
    return jax.lax.while_loop(lambda carry: jnp.all(carry[1] < 1e3), step, (0, a))[1]

  mesh = _mesh()
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  arg = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  text = fn.lower(arg).compile().as_text()
  res = hlo.parse_collectives(text, 8, unknown_trip_count=50)
  assert res["unknown_trip_loops"] == 1
  assert res["scaled"]["all-reduce"]["count"] == 50
  assert hlo.parse_collectives(text, 8)["scaled"]["all-reduce"]["count"] == 1


@pytest.mark.parametrize("attrs, size", [
    ("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, dimensions={0}", 4),
    ("replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}", 8),
    ("replica_groups={{0,2},{1,3}}, to_apply=%add", 2),
    ("replica_groups=[2,4]<=[8], dimensions={0}", 4),
    ("replica_groups={}, to_apply=%add", 16),
])
def test_group_size_formats(hlo, attrs, size):
  assert hlo.group_size(attrs, 16) == size


def test_array_shapes_of_tuples(hlo):
  shapes = hlo.array_shapes("(f32[4,16]{1,0}, bf16[2]{0}, /*index=2*/s32[], pred[3,1])")
  assert shapes == [("f32", (4, 16)), ("bf16", (2,)), ("s32", ()), ("pred", (3, 1))]
  assert hlo.shape_bytes(shapes) == 256 + 4 + 4 + 3


def test_programs_compile_with_sharded_abstract_inputs(scale):
  """The four programs of a narrow Llama on fsdp 8: each compiles, and its per-device arguments
  are at most 1/8 of the global state and batch: sharded, never a replicated copy."""
  cfg = scale.model_config("llama3-8b", layers=1, vocab_size=512, hidden_size=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, intermediate_size=128)
  work = scale.Workload(batch=16, prompt_len=8, response_len=8, num_minibatches=2)
  mesh = sharding.make_mesh((1, 8, 1), devices=jax.devices()[:8])
  programs = {**scale.ppo_programs(cfg, cfg.replace(param_dtype="bfloat16"), work, mesh),
              **scale.supervised_programs(cfg, work, mesh)}
  assert sorted(programs) == sorted(scale.PROGRAMS)
  for name, prog in programs.items():
    res = scale.measure(prog.fn, *prog.args, num_devices=8, batch_sizes=prog.rows)
    arrays = [x for x in jax.tree.leaves(prog.args) if isinstance(x, jax.ShapeDtypeStruct)]
    global_bytes = sum(x.size * x.dtype.itemsize for x in arrays if x.ndim)
    # Scalars (step, rng, KL coefficient, Adam counts) are replicated: at most a few KiB. (No
    # lower bound: jit drops the arguments a program never reads, e.g. Adam state in collect.)
    assert 0 < res["memory"]["argument"] <= global_bytes / 8 + 4096, name
    assert prog.ideal_wire_bytes > 0
  assert programs["collect"].loop_bound == work.response_len - 1
