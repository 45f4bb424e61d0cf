"""Pod scale by simulation: per-device memory, compile time and collectives of the real programs.

Lowers and compiles the project's own jitted programs (PPO `update` and `collect`, the SFT and
reward-model train steps) for Llama-3 8B / 70B shapes on fake CPU devices, with abstract inputs
only (`jax.eval_shape`, `jax.ShapeDtypeStruct(..., sharding=...)`), so nothing is allocated
(DESIGN.md section 4). For each program it prints the per-device memory of `memory_analysis()`,
lower and compile time, FLOPs of `cost_analysis()`, and the collectives parsed from the optimised
HLO: bytes per kind once per program text and scaled by the known trip counts of the loops they
sit in, next to the ideal FSDP traffic, and every all-reduce / all-gather that carries the global
batch (activations replicated instead of batch-sharded).

  python bench/scale.py --model llama3-8b --layers 2 --mesh 1,8,1 --programs update,collect

Figures and commands: bench/README.md, "Pod scale (simulated)".
"""

import argparse
import dataclasses
import math
import os
import sys
from typing import Callable

if __name__ == "__main__":  # the fake device count must be set before jax is imported
  _mesh = argparse.ArgumentParser(add_help=False)
  _mesh.add_argument("--mesh", default="1,8,1")
  _n = math.prod(int(s) for s in _mesh.parse_known_args()[0].mesh.split(","))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from rlhf_jax import kl as kl_lib  # noqa: E402
from rlhf_jax import ppo as ppo_lib  # noqa: E402
from rlhf_jax import sharding as sharding_lib  # noqa: E402
from rlhf_jax.models import CausalLM, DecoderConfig, ScalarModel  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from rlhf_jax.collect import collect  # noqa: E402
from rlhf_jax.rollout import SamplingConfig  # noqa: E402
from rlhf_jax.score import RewardNorm, reward_model_fn  # noqa: E402
from rlhf_jax.trainers import reward as reward_lib  # noqa: E402
from rlhf_jax.trainers import sft as sft_lib  # noqa: E402
from rlhf_jax.trainers.supervised import make_train_step  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from abstract import abstract_model, param_bytes, rows_sharded, sharded  # noqa: E402
from hlo_collectives import measure, report  # noqa: E402

PRESETS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_heads=32, num_kv_heads=8,
                      head_dim=128, intermediate_size=14336, num_layers=32),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, num_heads=64, num_kv_heads=8,
                       head_dim=128, intermediate_size=28672, num_layers=80),
}
PROGRAMS = ("update", "collect", "sft_step", "rm_step")
EOS, PAD = 1, 0


@dataclasses.dataclass(frozen=True)
class Workload:
  """One PPO iteration's shapes: `batch` prompts of `prompt_len` + `response_len` tokens; the
  supervised steps take `batch` rows (pairs) of prompt_len + response_len tokens."""
  batch: int = 64
  prompt_len: int = 512
  response_len: int = 512
  num_minibatches: int = 4
  ppo_epochs: int = 1
  micro_batch_size: int | None = None
  gather_weights: bool = False   # SamplingConfig.gather_weights of collect's rollout


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted program with abstract arguments.

  Attributes:
    fn, args: `fn.lower(*args)` lowers it.
    ideal_wire_bytes: FSDP traffic per device: every weight all-gathered once per forward (for
      collect: once per model), and once more per backward where its gradient is
      reduce-scattered, (f - 1) / f of its stored bytes each (f the fsdp size).
    rows: Global row counts, whose presence as a leading dimension marks an activation that is
      not batch-sharded.
    loop_bound: Iterations assumed for a loop without a known trip count (decoding: N - 1).
  """
  fn: Callable
  args: tuple
  ideal_wire_bytes: float
  rows: tuple[int, ...]
  loop_bound: int = 1


# --- the programs, with abstract sharded inputs -----------------------------------------------

def model_config(preset: str, layers: int | None = None, dtype: str = "bfloat16",
                 param_dtype: str = "float32", **overrides) -> DecoderConfig:
  """A Llama-3 shape from PRESETS, optionally shallower (`layers`) or narrower (`overrides`)."""
  kw = dict(PRESETS[preset], **overrides)
  if layers is not None:
    kw["num_layers"] = layers
  return DecoderConfig(model_type="llama", rope_theta=500000.0, max_position_embeddings=8192,
                       norm_eps=1e-5, eos_token_id=EOS, pad_token_id=PAD, dtype=dtype,
                       param_dtype=param_dtype, **kw)


def make_collect(ppo_cfg, ref_graphdef, reward_fn):
  """The trainer's collect program (`rlhf_jax.collect.collect`), its arguments positional."""
  def program(state, ref_params, reward_params, reward_norm, ids, mask, key, frozen=None):
    return collect(ppo_cfg, state, ids, mask, key, ref_graphdef=ref_graphdef,
                   ref_params=ref_params, reward_fn=reward_fn, reward_params=reward_params,
                   reward_norm=reward_norm, frozen=frozen)
  return program


def _fsdp_share(mesh) -> float:
  f = mesh.shape.get("fsdp", 1)
  return (f - 1) / f


def ppo_programs(cfg: DecoderConfig, frozen_cfg: DecoderConfig, work: Workload, mesh,
                 lora_cfg: lora.LoRAConfig = lora.LoRAConfig()) -> dict[str, Program]:
  """The PPO trainer's `update` (policy + separate critic, fp32 weights and Adam state, state
  donated) and `collect` (rollout, critic values, score with the frozen reference and reward
  model in `frozen_cfg`'s dtypes). With `lora_cfg` enabled, as the trainer runs LoRA: the
  state holds fp32 adapters (and the critic's head) with their Adam state, the frozen bases of
  policy and critic are a separate argument in `frozen_cfg`'s param dtype
  (`frozen_param_dtype`), and the reference is the policy's base: no reference weights."""
  b, p, n = work.batch, work.prompt_len, work.response_len
  sampling = SamplingConfig(max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD,
                            gather_weights=work.gather_weights)
  ppo_cfg = ppo_lib.PPOConfig(sampling=sampling, num_minibatches=work.num_minibatches,
                              ppo_epochs=work.ppo_epochs, micro_batch_size=work.micro_batch_size,
                              kl=kl_lib.KLConfig(estimator="k1", in_reward=True))
  tx = make_optimizer(OptimConfig())

  def models():
    policy, value = CausalLM(cfg, rngs=nnx.Rngs(0)), ScalarModel(cfg, rngs=nnx.Rngs(1))
    if lora_cfg.enabled:
      policy = lora.add_adapters(policy, lora_cfg, jax.random.key(4))
      value = lora.add_adapters(value, lora_cfg, jax.random.key(5))
    return policy, value

  def init():
    policy, value = models()
    frozen = jax.tree.map(lambda x: x.astype(frozen_cfg.weight_dtype),
                          ppo_lib.frozen_params(ppo_cfg, policy, value))
    return ppo_lib.init_train_state(ppo_cfg, policy, tx, jax.random.key(0), value), frozen

  state, frozen = jax.eval_shape(init)
  state_sh = ppo_lib.train_state_shardings(state, mesh)
  state = sharded(state, state_sh)
  frozen_bytes = 0
  if lora_cfg.enabled:
    frozen = {k: sharded(v, sharding_lib.param_shardings(v, mesh)) for k, v in frozen.items()}
    frozen_bytes = param_bytes(frozen)
    ref_graphdef = lora.base(nnx.eval_shape(models)[0])[0]
    ref_params, ref_bytes = None, param_bytes(frozen["policy"])
  else:
    frozen = None
    ref_graphdef, ref_params = abstract_model(CausalLM, frozen_cfg, mesh, 2)
    ref_bytes = param_bytes(ref_params)
  reward_graphdef, reward_params = abstract_model(ScalarModel, frozen_cfg, mesh, 3)
  collect_program = jax.jit(make_collect(ppo_cfg, ref_graphdef, reward_model_fn(reward_graphdef)))
  rep = sharding_lib.replicated(mesh)
  ids = rows_sharded(jax.ShapeDtypeStruct((b, p), jnp.int32), mesh)
  norm = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                      jax.eval_shape(RewardNorm.identity))
  collect_args = (state, ref_params, reward_params, norm, ids, ids,
                  jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep), frozen)
  scored = rows_sharded(jax.eval_shape(collect_program, *collect_args)[0], mesh)
  update = jax.jit(ppo_lib.ppo_update, static_argnums=0, donate_argnums=1,
                   out_shardings=(state_sh, None))
  policy, value = param_bytes(state.params["policy"]), param_bytes(state.params["value"])
  steps = work.ppo_epochs * work.num_minibatches
  # Each model's weights gathered once: a sampler that gathered them per decode step would move
  # N times the policy instead (`SamplingConfig.gather_weights` gathers them once).
  # Under LoRA the reference forward gathers the policy's base once more.
  collect_ideal = policy + value + frozen_bytes + ref_bytes + param_bytes(reward_params)
  # Trained weights: gathered for the forward and the backward, gradient reduce-scattered;
  # frozen ones: gathered twice, no gradient.
  update_ideal = steps * (3 * (policy + value) + 2 * frozen_bytes) * _fsdp_share(mesh)
  return {
      "update": Program(update, (ppo_cfg, state, scored, frozen), update_ideal,
                        (b // work.num_minibatches, b)),
      "collect": Program(collect_program, collect_args, collect_ideal * _fsdp_share(mesh), (b,), n - 1),
  }


def supervised_programs(cfg: DecoderConfig, work: Workload, mesh) -> dict[str, Program]:
  """The supervised trainers' steps (params and Adam state donated) on `batch` rows of
  P + N tokens: "sft_step" (CausalLM, SFT loss) and "rm_step" (ScalarModel, Bradley-Terry on
  `batch` pairs, 2 x batch rows in one forward)."""
  tx = make_optimizer(OptimConfig())
  rep = sharding_lib.replicated(mesh)
  length = work.prompt_len + work.response_len
  rows = rows_sharded(jax.ShapeDtypeStruct((work.batch, length), jnp.int32), mesh)
  out = {}
  for name, cls, loss, keys, sizes in (
      ("sft_step", CausalLM, sft_lib.sft_batch_loss, ("ids", "attention_mask", "completion_mask"),
       (work.batch,)),
      ("rm_step", ScalarModel, reward_lib.reward_batch_loss,
       ("chosen_ids", "chosen_attention_mask", "rejected_ids", "rejected_attention_mask"),
       (work.batch, 2 * work.batch))):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    param_sh = sharding_lib.param_shardings(params, mesh)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    step = jax.jit(make_train_step(loss, graphdef, tx), donate_argnums=(0, 1),
                   out_shardings=(param_sh, opt_sh, rep))
    args = (sharded(params, param_sh), sharded(opt, opt_sh), {k: rows for k in keys})
    out[name] = Program(step, args, 3 * param_bytes(params) * _fsdp_share(mesh), sizes)
  return out


# --- command line ---------------------------------------------------------------------------

def run(args) -> list[dict]:
  jax.config.update("jax_threefry_partitionable", True)
  shape = tuple(int(s) for s in args.mesh.split(","))
  mesh = sharding_lib.make_mesh(shape, devices=jax.devices()[:math.prod(shape)])
  work = Workload(args.batch, args.prompt_len, args.response_len, args.num_minibatches,
                  args.ppo_epochs, args.micro_batch_size, args.gather_weights)
  cfg = model_config(args.model, args.layers, args.dtype, remat=args.remat)
  frozen = cfg.replace(param_dtype=args.frozen_dtype, dtype=args.dtype)
  wanted = args.programs.split(",")
  programs = {}
  if {"update", "collect"} & set(wanted):
    programs.update(ppo_programs(cfg, frozen, work, mesh, lora.LoRAConfig(
        rank=args.lora_rank, alpha=args.lora_alpha, target_modules=args.lora_targets)))
  if {"sft_step", "rm_step"} & set(wanted):
    programs.update(supervised_programs(cfg, work, mesh))
  lengths = (work.prompt_len, work.response_len, work.prompt_len + work.response_len)
  results = []
  for name in wanted:
    prog = programs[name]
    with jax.set_mesh(mesh):   # as the trainers trace: the activation constraints apply
      res = measure(prog.fn, *prog.args, num_devices=mesh.size, batch_sizes=prog.rows,
                    flat_sizes=[b * t for b in prog.rows for t in lengths],
                    unknown_trip_count=prog.loop_bound)
    res.update(program=name, model=args.model, layers=cfg.num_layers, mesh=shape,
               lora_rank=args.lora_rank if name in ("update", "collect") else 0,
               workload=dataclasses.asdict(work), ideal_fsdp_wire_bytes=prog.ideal_wire_bytes)
    report(res)
    results.append(res)
  return results


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama3-8b", choices=sorted(PRESETS))
  ap.add_argument("--layers", type=int, default=None, help="override the preset's depth")
  ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes")
  ap.add_argument("--programs", default=",".join(PROGRAMS))
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=512)
  ap.add_argument("--response_len", type=int, default=512)
  ap.add_argument("--num_minibatches", type=int, default=4)
  ap.add_argument("--ppo_epochs", type=int, default=1)
  ap.add_argument("--micro_batch_size", type=int, default=None,
                  help="PPO gradient accumulation: rows per microbatch (global)")
  ap.add_argument("--gather_weights", action="store_true",
                  help="collect: the sampler gathers the policy over fsdp once per rollout")
  ap.add_argument("--remat", default="none", help="DecoderConfig.remat of the trained models")
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype of every model")
  ap.add_argument("--frozen_dtype", default="bfloat16",
                  help="param dtype of reference + reward (and, under LoRA, the frozen bases)")
  ap.add_argument("--lora_rank", type=int, default=0,
                  help="PPO with LoRA adapters of this rank on policy and critic (0: full)")
  ap.add_argument("--lora_alpha", type=float, default=16.0)
  ap.add_argument("--lora_targets", default=lora.LoRAConfig.target_modules,
                  help="regex over the projection names (lora.LoRAConfig.target_modules)")
  args = ap.parse_args(argv)
  unknown = set(args.programs.split(",")) - set(PROGRAMS)
  if unknown:
    ap.error(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
  return args


if __name__ == "__main__":
  run(parse_args())
