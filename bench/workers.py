"""The two worker processes the orchestrator (ppo_bench.py) starts: the matmul peak, and rlhf_jax
running and timing the PPO workload. Each prints one JSON line, its result, on stdout.

What rlhf_jax's worker times (see bench/README.md, "What is measured"):
  * a PPO iteration and its phases: collect (the trainer's own jitted `rlhf_jax.collect`:
    rollout, then the critic's values, reference log-probs and reward), update (jitted
    `ppo_update`, the train state donated). `block_until_ready` only at phase boundaries. Compile time (lower + compile,
    ahead of the first call) is reported on its own.
  * generation alone: B x R generated tokens / time (includes the prefill, as TRL's does).
  * policy forward + backward alone: jitted value_and_grad of the next-token LM loss on B x (P+R)
    tokens.
"""

import functools
import platform
import resource
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

from rlhf_jax import kl as kl_lib
from rlhf_jax import models
from rlhf_jax import ppo as ppo_lib
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.collect import collect
from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.losses import PolicyLossConfig, ValueLossConfig
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.rollout import SamplingConfig, rollout
from rlhf_jax.score import reward_model_fn
from flops import gflops
from workload import EOS_ID, FIRST_ID, PAD_ID, TEMPERATURE, log, median


def worker_peak(args) -> dict:
  """Best float32 (numpy) and compute-dtype (jnp.dot) GFLOP/s over square sizes, best of reps."""
  sizes = [int(s) for s in args.peak_sizes.split(",")]
  rng = np.random.default_rng(0)

  def best(fn, a, b):
    fn(a, b)
    times = []
    for _ in range(args.peak_reps):
      t0 = time.perf_counter()
      fn(a, b)
      times.append(time.perf_counter() - t0)
    return min(times)

  dot = jax.jit(jnp.dot)
  out = {"numpy": {}, "jax": {}}
  for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out["numpy"][n] = gflops(2 * n ** 3, best(np.matmul, a, b))
    ja, jb = jnp.asarray(a, args.dtype), jnp.asarray(b, args.dtype)
    out["jax"][n] = gflops(2 * n ** 3, best(lambda x, y: dot(x, y).block_until_ready(), ja, jb))
    log(f"[peak] n={n}: numpy {out['numpy'][n]} GFLOP/s, jnp.dot ({args.dtype}) "
        f"{out['jax'][n]} GFLOP/s")
  return {"numpy_gflops": max(out["numpy"].values()), "jax_gflops": max(out["jax"].values()),
          "per_size": out, "jax_dtype": args.dtype, "numpy_dtype": "float32",
          "device": str(jax.devices()[0])}


def _model_config(p: dict, dtype: str):
  # Through the Hugging Face GPT2Config fields, so every GPT-2 default (gelu_new, LayerNorm eps
  # 1e-5, biases, tied embeddings, learned positions) is the one TRL's models have.
  return models.from_hf_config(
      {"model_type": "gpt2", "vocab_size": p["vocab"], "n_embd": p["n_embd"],
       "n_layer": p["n_layer"], "n_head": p["n_head"], "n_positions": p["n_positions"],
       "pad_token_id": PAD_ID, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID},
      num_labels=1, dtype=dtype, param_dtype="float32",
      # Models this small on one device are bound by FLOPs, not memory (DecoderConfig).
      last_block_rows=True)


def worker_ours(args, p: dict) -> dict:
  """Builds the workload with rlhf_jax and times it (see the module docstring)."""
  jax.config.update("jax_threefry_partitionable", True)
  tag = "ours" if args.critic == "separate" else "ours-shared"
  b, mb, e = p["batch"], p["mini_batch"], p["ppo_epochs"]
  pl, r, v = p["prompt_len"], p["response_len"], p["vocab"]
  if b % mb:
    raise ValueError(f"batch {b} is not divisible by mini_batch {mb}")
  cfg = _model_config(p, args.dtype)
  policy = models.CausalLM(cfg, rngs=nnx.Rngs(args.seed))
  # GPT2ForSequenceClassification's score head is normal(0.02), not zero.
  value_model = models.ScalarModel(cfg, rngs=nnx.Rngs(args.seed + 1), head_std=0.02)
  reward_model = models.ScalarModel(cfg, rngs=nnx.Rngs(args.seed + 2), head_std=0.02)
  params_count = {name: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
                  for name, m in (("policy", policy), ("value", value_model),
                                  ("reward", reward_model))}

  kl_cfg = kl_lib.KLConfig(estimator="k1", in_reward=True, init_coef=0.05, controller="fixed")
  # No stop token: every response has exactly R tokens, as in TRL's benchmark.
  sampling = SamplingConfig(max_new_tokens=r, temperature=TEMPERATURE, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID, ignore_eos=True)
  ppo_cfg = ppo_lib.PPOConfig(
      sampling=sampling,
      policy_loss=PolicyLossConfig(name="ppo", clip_eps=0.2),
      value_loss=ValueLossConfig(name="clipped", clip_eps=0.2),
      advantage=AdvantageConfig(estimator="gae", gamma=1.0, lam=0.95), kl=kl_cfg,
      critic=args.critic, ppo_epochs=e, num_minibatches=b // mb, vf_coef=0.1, ent_coef=0.0,
      whiten_advantages=True)
  # torch AdamW defaults (eps 1e-8) with TRL's lr; TRL's PPO never clips gradients. TRL steps its
  # linear schedule once per iteration, optax once per minibatch: same work, slightly other lrs.
  steps = args.iters * e * (b // mb)
  tx = make_optimizer(OptimConfig(learning_rate=3e-6, schedule="linear", total_steps=steps,
                                  weight_decay=0.0, eps=1e-8, max_grad_norm=0.0))

  graphdef, policy_params = nnx.split(policy)
  # The reference is a copy: the train state's buffers are donated, the reference's never are.
  ref_params = jax.tree.map(jnp.copy, policy_params)
  reward_graphdef, reward_params = nnx.split(reward_model)
  state = ppo_lib.init_train_state(ppo_cfg, policy, tx, jax.random.key(args.seed),
                                   value_model if args.critic == "separate" else None)
  del policy, value_model, reward_model
  # The trainer's collect program, as PPOTrainer jits it.
  collect_jit = jax.jit(functools.partial(collect, ppo_cfg, ref_graphdef=graphdef,
                                          reward_fn=reward_model_fn(reward_graphdef)))

  def lm_loss(params, ids):
    # The head on the T - 1 positions that have a next token, the ones the loss reads: computing
    # the last position's logits too and slicing them off kept a second [B, T, V] buffer alive.
    model = nnx.merge(graphdef, params)
    hidden, _ = model.decoder(ids)
    return -token_logprobs(model.logits(hidden[:, :-1]), ids[:, 1:]).mean()

  rng = np.random.default_rng(args.seed + 10)
  prompts = jnp.asarray(rng.integers(FIRST_ID, v, (args.iters, b, pl), dtype=np.int32))
  mask = jnp.ones((b, pl), jnp.int32)
  key = jax.random.key(args.seed + 1)

  compile_s, temp_mib = {}, {}
  rss = {"built": _rss_mib()}

  def compile_(name, fn, *specs, **kw_specs):
    t0 = time.perf_counter()
    compiled = fn.lower(*specs, **kw_specs).compile()
    compile_s[name] = round(time.perf_counter() - t0, 3)
    # XLA's scratch for one call, on top of its arguments and outputs: what moves peak memory.
    analysis = compiled.memory_analysis()
    if analysis is not None:
      temp_mib[name] = round(analysis.temp_size_in_bytes / 2 ** 20, 1)
    log(f"[{tag}] compiled {name} in {compile_s[name]:.1f} s, temp {temp_mib.get(name)} MiB")
    return compiled

  frozen = dict(ref_params=ref_params, reward_params=reward_params)
  collect_c = compile_("collect", collect_jit, state, prompts[0], mask, key, **frozen)
  scored_spec = jax.eval_shape(collect_jit, state, prompts[0], mask, key, **frozen)[0]
  update_c = compile_("update", jax.jit(functools.partial(ppo_lib.ppo_update, ppo_cfg),
                                        donate_argnums=0), state, scored_spec)

  rss["compiled"] = _rss_mib()
  res = {"workload": p, "critic": args.critic, "dtype": args.dtype, "params": params_count,
         "compile_s": compile_s, "temp_mib": temp_mib,
         "peak_rss_mib_after": rss}
  iters, phases, finite = [], [], True
  for i in range(args.iters):
    t0 = time.perf_counter()
    scored, score_metrics = jax.block_until_ready(
        collect_c(state, prompts[i], mask, jax.random.fold_in(key, i), **frozen))
    t1 = time.perf_counter()
    state, update_metrics = jax.block_until_ready(update_c(state, scored))
    t2 = time.perf_counter()
    metrics = jax.device_get({**score_metrics, **update_metrics})
    t3 = time.perf_counter()
    finite &= all(np.isfinite(x).all() for x in metrics.values())
    ph = {"collect": t1 - t0, "update": t2 - t1, "other": t3 - t2}
    iters.append(t3 - t0)
    phases.append(ph)
    log(f"[{tag}] iter {i + 1}/{args.iters}: {t3 - t0:7.3f} s  "
        + "  ".join(f"{k}={x:.3f}" for k, x in ph.items()))
  rss["ppo"] = _rss_mib()
  # The micro-benchmarks come after the PPO iterations, so that `peak_rss_mib_after["ppo"]` is the
  # PPO workload's own peak, and run with only the policy alive, as TRL's script runs them (before
  # it builds its trainer): the value model, the reference, the reward model and the optimizer
  # state are freed first.
  policy_params = state.params["policy"]
  del state, ref_params, reward_params, frozen, scored
  if not args.skip_micro:
    gen_c = compile_("generation", jax.jit(functools.partial(rollout, graphdef, cfg=sampling)),
                     policy_params, prompts[0], mask, key)
    res["generation"] = _time_reps(
        args.gen_reps, lambda: gen_c(policy_params, prompts[0], mask, key))
    res["generation"]["gen_tokens_per_s"] = round(b * r / res["generation"]["median_s"], 2)
    log(f"[{tag}] generation alone: {res['generation']['median_s']:.3f} s -> "
        f"{res['generation']['gen_tokens_per_s']:.1f} gen tok/s")
    seqs = jnp.asarray(rng.integers(FIRST_ID, v, (b, pl + r), dtype=np.int32))
    fb_c = compile_("fwd_bwd", jax.jit(jax.value_and_grad(lm_loss)), policy_params, seqs)
    res["fwd_bwd"] = _time_reps(args.fb_reps, lambda: fb_c(policy_params, seqs))
    res["fwd_bwd"]["tokens_per_s"] = round(seqs.size / res["fwd_bwd"]["median_s"], 2)
    log(f"[{tag}] policy fwd+bwd alone: {res['fwd_bwd']['median_s']:.3f} s -> "
        f"{res['fwd_bwd']['tokens_per_s']:.1f} tok/s")
    rss["micro"] = _rss_mib()
  measured = slice(args.warmup, None) if args.iters > args.warmup else slice(None)
  res.update(
      iter_times_s=[round(x, 4) for x in iters],
      iters_measured=len(iters[measured]),
      iter_median_s=round(median(iters[measured]), 4),
      phase_median_s={k: round(median([ph[k] for ph in phases[measured]]), 4) for k in phases[0]},
      metrics_finite=bool(finite),
      last_metrics={k: round(float(x), 5) for k, x in metrics.items()},
      versions=_versions(), device=str(jax.devices()[0]))
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    res["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2 ** 20, 1)
  return res


def _rss_mib() -> float:
  """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _time_reps(reps: int, fn) -> dict:
  """One warm-up call, then `reps` timed calls, each waited on."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"times_s": [round(t, 4) for t in times], "median_s": round(median(times), 4)}


def _versions() -> dict:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__}
