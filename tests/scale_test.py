"""bench/scale.py and bench/hlo_collectives.py: collectives parsed from compiled HLO with known
sizes, and the tool's programs compiled on a narrow model with abstract sharded inputs."""

import importlib.util
import math
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


# Pod-scale properties on 8 fake devices and a narrow Llama none of whose sizes (nor their 8-way
# shards) equals a global row count (16, 8, 32) or rows x positions (256, 512, 1024), so that a
# flagged op is a real one.
WORK = dict(batch=16, prompt_len=16, response_len=16, num_minibatches=2)
NARROW = dict(layers=2, vocab_size=1000, hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=6,
              intermediate_size=160)


def _measure(scale, devices: int, name: str):
  cfg = scale.model_config("llama3-8b", **NARROW)
  work = scale.Workload(**WORK)
  mesh = sharding.make_mesh((1, devices, 1), devices=jax.devices()[:devices])
  programs = {**scale.ppo_programs(cfg, cfg.replace(param_dtype="bfloat16"), work, mesh),
              **scale.supervised_programs(cfg, work, mesh)}
  prog = programs[name]
  lengths = (work.prompt_len, work.response_len, work.prompt_len + work.response_len)
  with jax.set_mesh(mesh):   # as the trainers trace
    return work, scale.measure(prog.fn, *prog.args, num_devices=devices, batch_sizes=prog.rows,
                               flat_sizes=[b * t for b in prog.rows for t in lengths])


@pytest.mark.parametrize("name", ["update", "collect", "sft_step", "rm_step"])
def test_activations_stay_batch_sharded_and_temporaries_fall_with_devices(scale, name):
  """fsdp means gathered weights and batch-sharded activations: no all-reduce / all-gather of the
  8-device program may carry the global batch's hidden states, logits or MLP activations (more
  than one float per token of it; per-row scalars such as scores are allowed), and a training
  step's temporaries fall roughly as 1/devices from the 1-device program's."""
  work, res = _measure(scale, 8, name)
  per_token = work.batch * 2 * (work.prompt_len + work.response_len) * 4   # rm: 2 rows a pair
  def largest(arrays):   # elements of the op's largest array, at 4 bytes each
    return max((4 * math.prod(shape) for _, shape in arrays), default=0)
  bad = [o for o in res["collectives"]["ops"]
         if o["global_batch"] and max(largest(o["operand"]), largest(o["result"])) > per_token]
  assert not bad, "; ".join(f"{o['kind']} {o['operand']} -> {o['result']}" for o in bad[:3])
  if name != "collect":
    temp = {1: _measure(scale, 1, name)[1]["memory"]["temp"], 8: res["memory"]["temp"]}
    assert temp[8] <= 2.0 * temp[1] / 8, temp


def test_gathered_sampler_weights_leave_the_decode_loop_without_gathers(scale):
  """`SamplingConfig.gather_weights`: collect gathers each weight once, before the decode loop,
  instead of at each of its N - 1 steps."""
  cfg = scale.model_config("llama3-8b", **NARROW)
  mesh = sharding.make_mesh((1, 4, 2), devices=jax.devices()[:8])
  res = {}
  for gather in (False, True):
    work = scale.Workload(**WORK, gather_weights=gather)
    prog = scale.ppo_programs(cfg, cfg.replace(param_dtype="bfloat16"), work, mesh)["collect"]
    with jax.set_mesh(mesh):
      res[gather] = scale.measure(prog.fn, *prog.args, num_devices=8, batch_sizes=prog.rows,
                                  unknown_trip_count=prog.loop_bound)["collectives"]
  once, per_step = res[True], res[False]
  # Gathers over the fsdp group (4) at every decode step; what stays in the loop are the
  # tensor-parallel decode's own small collectives over the tensor pairs.
  in_loop = lambda r: [o for o in r["ops"] if o["kind"] == "all-gather" and o["group"] == 4
                       and o["times"] >= prog.loop_bound]
  assert in_loop(per_step) and not in_loop(once)
  gathered = lambda r: r["scaled"]["all-gather"]["wire_bytes"]
  # (At this size the scoring forwards' per-layer gathers are a good part of what is left.)
  assert 2 * gathered(once) < gathered(per_step), (gathered(once), gathered(per_step))
