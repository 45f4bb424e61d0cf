"""PPO benchmark of rlhf_jax, side by side with Hugging Face TRL on the same workload.

The workloads are TRL's `tiny` and `small` presets (shared/reference/trl_ppo_cpu.md): random-init
GPT-2 shapes, a policy, its reference copy, a separate value model and a separate reward model
(each a ScalarModel with its own random init), random prompt ids in [3, V), temperature 0.7, no stop
token (every response has exactly R tokens), B prompts per iteration, num_minibatches = B / mb,
one AdamW step per minibatch (lr 3e-6, linear decay, no weight decay, no gradient clipping), KL
k1 with coefficient 0.05 in the reward, cliprange 0.2 (policy and value), vf_coef 0.1, GAE with
gamma 1 and lambda 0.95, float32.

What is timed, in a process of its own per framework (so its max RSS is that framework's):
  * a PPO iteration and its phases: generation (jitted `rollout`), scoring (jitted `critic_values`
    + `score`: reference log-probs, values and reward), update (jitted `ppo_update`, the train
    state donated). `block_until_ready` only at phase boundaries. Median over the iterations after
    `--warmup`; compile time (lower + compile, ahead of the first call) is reported on its own.
  * generation alone: B x R generated tokens / time (includes the prefill, as TRL's does).
  * policy forward + backward alone: jitted value_and_grad of the next-token LM loss on B x (P+R)
    tokens, logits at the P+R-1 positions that have a next token (TRL's `labels=ids` call computes
    all P+R and drops the last one in its loss).
FLOPs: TRL's formula (matmul FLOPs of the workload, backward = 2 x forward) gives `mfu`, so the two
frameworks' MFU compare; `mfu_executed` uses the FLOPs rlhf_jax's programs actually run (the LM
head only on the R completion positions when scoring and training, attention over every slot of
its buffer, the prefill's LM head at its last position only).
Peak: square float32 matmuls with numpy and jnp.dot, measured in the same run (the max is the
peak); it is handed to the TRL run too, so both MFUs use one denominator.

Usage (from the repository root):
  python bench/ppo_bench.py --preset tiny --iters 5
  python bench/ppo_bench.py --preset tiny --iters 5 --rounds 2 \
      --peer-venv .venv-peer-trl --peer-script ../shared/peers/trl_ppo_baseline.py
Progress goes to stderr; the last line on stdout is one JSON object with every number.
"""

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PRESETS = {
    "tiny": dict(vocab=8192, n_layer=4, n_embd=256, n_head=4, n_positions=256,
                 prompt_len=32, response_len=32, batch=64, mini_batch=16, ppo_epochs=4),
    # GPT-2 124M.
    "small": dict(vocab=50257, n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                  prompt_len=64, response_len=64, batch=16, mini_batch=4, ppo_epochs=1),
}
OVERRIDES = ("batch", "mini_batch", "ppo_epochs", "prompt_len", "response_len", "n_layer")
PAD_ID, EOS_ID, FIRST_ID = 0, 1, 3
TEMPERATURE = 0.7


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def median(xs):
  return statistics.median(xs) if xs else None


def ratio(a, b):
  return round(a / b, 4) if a is not None and b else None


# --- FLOPs --------------------------------------------------------------------------------------


def trl_flops(p: dict) -> dict:
  """Model FLOPs per iteration exactly as TRL's baseline counts them (trl_ppo_cpu.md).

  Matmul FLOPs at 2 per multiply-add, backward = 2 x forward, causal attention over t+1 keys:
    fwd_lm     = 24 L d^2 T + 2 L d T (T+1) + 2 d V T
    fwd_scalar = 24 L d^2 T + 2 L d T (T+1) + 2 d T
    gen        = 24 L d^2 (T-1) + 2 L d (T-1) T + 2 d V R
    iteration  = B [gen + fwd_lm + 2 fwd_scalar + 3 E (fwd_lm + fwd_scalar)]
  """
  l, d, v = p["n_layer"], p["n_embd"], p["vocab"]
  pl, r, b, e = p["prompt_len"], p["response_len"], p["batch"], p["ppo_epochs"]
  t = pl + r
  dense = 24 * l * d * d
  backbone = dense * t + 2 * l * d * t * (t + 1)
  fwd_lm = backbone + 2 * d * v * t
  fwd_scalar = backbone + 2 * d * t
  gen = dense * (t - 1) + 2 * l * d * (t - 1) * t + 2 * d * v * r
  per_iter = {"generation": b * gen, "ref_fwd": b * fwd_lm, "value_fwd": b * fwd_scalar,
              "reward_fwd": b * fwd_scalar, "ppo_train_fwd_bwd": b * 3 * e * (fwd_lm + fwd_scalar)}
  return {"per_iteration": dict(per_iter, total=sum(per_iter.values())),
          "generation_batch": b * gen, "fwd_bwd_batch": 3 * b * fwd_lm}


def executed_flops(p: dict, critic: str) -> dict:
  """Matmul FLOPs the rlhf_jax programs run for the same workload (same counting rules).

  Differences from `trl_flops`: attention scores every key slot of the buffer (4 L d T S per
  sequence, masked afterwards, S = T); scoring and training apply the LM head to the R positions
  that predict completion tokens only, and their last block computes queries, attention and MLP
  (20 d^2 + 4 d S per row) for those R rows only; the reward head reads one position; generation
  is a prefill with the LM head and the last block's queries at its last position, then R - 1
  decode steps, attending over a cache of S = T - 1 slots. A shared critic reuses the policy
  trunk: no value backbone in training.
  """
  l, d, v = p["n_layer"], p["n_embd"], p["vocab"]
  pl, r, b, e = p["prompt_len"], p["response_len"], p["batch"], p["ppo_epochs"]
  t = pl + r
  dense = 24 * l * d * d
  lm = 2 * d * v
  backbone = dense * t + 4 * l * d * t * t
  gen = (dense * (t - 1) + lm * r + 4 * l * d * (t - 1) * (t - 1)
         - (20 * d * d + 4 * d * (t - 1)) * (pl - 1))
  kept = backbone - (20 * d * d + 4 * d * t) * (t - r)
  policy_fwd = kept + lm * r
  value_fwd = kept + 2 * d * r
  train_fwd = policy_fwd + (value_fwd if critic == "separate" else 2 * d * r)
  per_iter = {"generation": b * gen, "ref_fwd": b * policy_fwd, "value_fwd": b * value_fwd,
              "reward_fwd": b * (backbone + 2 * d), "ppo_train_fwd_bwd": b * 3 * e * train_fwd}
  return {"per_iteration": dict(per_iter, total=sum(per_iter.values())),
          "generation_batch": b * gen, "fwd_bwd_batch": 3 * b * (backbone + lm * (t - 1))}


def gflops(flops, seconds):
  return round(flops / seconds / 1e9, 2) if seconds else None


def mfu(flops, seconds, peak):
  return round(flops / seconds / 1e9 / peak, 4) if seconds and peak else None


# --- workers (each runs in its own process) ------------------------------------------------------


def worker_peak(args) -> dict:
  """Best float32 (numpy) and compute-dtype (jnp.dot) GFLOP/s over square sizes, best of reps."""
  import jax
  import jax.numpy as jnp
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
  from rlhf_jax import models
  # Through the Hugging Face GPT2Config fields, so every GPT-2 default (gelu_new, LayerNorm eps
  # 1e-5, biases, tied embeddings, learned positions) is the one TRL's models have.
  return models.from_hf_config(
      {"model_type": "gpt2", "vocab_size": p["vocab"], "n_embd": p["n_embd"],
       "n_layer": p["n_layer"], "n_head": p["n_head"], "n_positions": p["n_positions"],
       "pad_token_id": PAD_ID, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID},
      num_labels=1, dtype=dtype, param_dtype="float32")


def worker_ours(args, p: dict) -> dict:
  """Builds the workload with rlhf_jax and times it (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from rlhf_jax import kl as kl_lib
  from rlhf_jax import models
  from rlhf_jax import ppo as ppo_lib
  from rlhf_jax.advantages import AdvantageConfig
  from rlhf_jax.losses import PolicyLossConfig, ValueLossConfig, token_logprobs
  from rlhf_jax.optim import OptimConfig, make_optimizer
  from rlhf_jax.rollout import SamplingConfig, rollout
  from rlhf_jax.score import ScoreConfig, reward_model_fn, score

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
  ppo_cfg = ppo_lib.PPOConfig(
      policy_loss=PolicyLossConfig(name="ppo", clip_eps=0.2),
      value_loss=ValueLossConfig(name="clipped", clip_eps=0.2),
      advantage=AdvantageConfig(estimator="gae", gamma=1.0, lam=0.95), kl=kl_cfg,
      critic=args.critic, ppo_epochs=e, num_minibatches=b // mb, vf_coef=0.1, ent_coef=0.0,
      whiten_advantages=True, temperature=TEMPERATURE)
  # torch AdamW defaults (eps 1e-8) with TRL's lr; TRL's PPO never clips gradients. TRL steps its
  # linear schedule once per iteration, optax once per minibatch: same work, slightly other lrs.
  steps = args.iters * e * (b // mb)
  tx = make_optimizer(OptimConfig(learning_rate=3e-6, schedule="linear", total_steps=steps,
                                  weight_decay=0.0, eps=1e-8, max_grad_norm=0.0))
  sampling = SamplingConfig(max_new_tokens=r, eos_token_id=None, pad_token_id=PAD_ID,
                            temperature=TEMPERATURE)
  score_cfg = ScoreConfig(eos_token_id=EOS_ID, temperature=TEMPERATURE, kl=kl_cfg)

  graphdef, policy_params = nnx.split(policy)
  # The reference is a copy: the train state's buffers are donated, the reference's never are.
  ref_params = jax.tree.map(jnp.copy, policy_params)
  reward_graphdef, reward_params = nnx.split(reward_model)
  reward_fn = reward_model_fn(reward_graphdef)
  state = ppo_lib.init_train_state(ppo_cfg, policy, tx, jax.random.key(args.seed),
                                   value_model if args.critic == "separate" else None)
  del policy, value_model, reward_model

  def generate(params, ids, mask, key):
    return rollout(graphdef, params, ids, mask, key, sampling)

  def score_batch(state, ref_params, reward_params, ro):
    values = ppo_lib.critic_values(ppo_cfg, state, ro)
    return score(score_cfg, ro, ref_graphdef=graphdef, ref_params=ref_params,
                 reward_fn=reward_fn, reward_params=reward_params, kl_coef=state.kl.coef,
                 values=values)

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

  def compile_(name, fn, *specs):
    t0 = time.perf_counter()
    compiled = fn.lower(*specs).compile()
    compile_s[name] = round(time.perf_counter() - t0, 3)
    # XLA's scratch for one call, on top of its arguments and outputs: what moves peak memory.
    analysis = compiled.memory_analysis()
    if analysis is not None:
      temp_mib[name] = round(analysis.temp_size_in_bytes / 2 ** 20, 1)
    log(f"[{tag}] compiled {name} in {compile_s[name]:.1f} s, temp {temp_mib.get(name)} MiB")
    return compiled

  gen_jit = jax.jit(generate)
  score_jit = jax.jit(score_batch)
  gen_c = compile_("generation", gen_jit, state.params["policy"], prompts[0], mask, key)
  ro_spec = jax.eval_shape(gen_jit, state.params["policy"], prompts[0], mask, key)
  score_c = compile_("scoring", score_jit, state, ref_params, reward_params, ro_spec)
  scored_spec = jax.eval_shape(score_jit, state, ref_params, reward_params, ro_spec)[0]
  update_c = compile_("update", jax.jit(functools.partial(ppo_lib.ppo_update, ppo_cfg),
                                        donate_argnums=0), state, scored_spec)

  rss["compiled"] = _rss_mib()
  res = {"workload": p, "critic": args.critic, "dtype": args.dtype, "params": params_count,
         "compile_s": compile_s, "temp_mib": temp_mib,
         "peak_rss_mib_after": rss}
  iters, phases, finite = [], [], True
  for i in range(args.iters):
    t0 = time.perf_counter()
    ro = jax.block_until_ready(gen_c(state.params["policy"], prompts[i], mask,
                                     jax.random.fold_in(key, i)))
    t1 = time.perf_counter()
    scored, score_metrics = jax.block_until_ready(
        score_c(state, ref_params, reward_params, ro))
    t2 = time.perf_counter()
    state, update_metrics = jax.block_until_ready(update_c(state, scored))
    t3 = time.perf_counter()
    metrics = jax.device_get({**score_metrics, **update_metrics})
    t4 = time.perf_counter()
    finite &= all(np.isfinite(x).all() for x in metrics.values())
    ph = {"generation": t1 - t0, "scoring": t2 - t1, "update": t3 - t2, "other": t4 - t3}
    iters.append(t4 - t0)
    phases.append(ph)
    log(f"[{tag}] iter {i + 1}/{args.iters}: {t4 - t0:7.3f} s  "
        + "  ".join(f"{k}={x:.3f}" for k, x in ph.items()))
  rss["ppo"] = _rss_mib()
  # The micro-benchmarks come after the PPO iterations, so that `peak_rss_mib_after["ppo"]` is the
  # PPO workload's own peak, and run with only the policy alive, as TRL's script runs them (before
  # it builds its trainer): the value model, the reference, the reward model and the optimizer
  # state are freed first.
  policy_params = state.params["policy"]
  del state, ref_params, reward_params, ro, scored
  if not args.skip_micro:
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
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"times_s": [round(t, 4) for t in times], "median_s": round(median(times), 4)}


def _versions() -> dict:
  import flax
  import jax
  import jaxlib
  import optax
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__}


# --- orchestration -------------------------------------------------------------------------------


def run_child(cmd: list[str], tag: str, echo_stdout: bool) -> dict:
  """Runs one benchmark process; returns its last stdout line (JSON) plus its max RSS.

  The child is reaped with os.wait4, so ru_maxrss is that process's own peak resident memory.
  """
  log(f"[{tag}] $ {' '.join(cmd)}")
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
  last = ""
  for line in proc.stdout:
    if line.strip():
      last = line
      if echo_stdout and not line.startswith("{"):
        log(f"[{tag}] {line.rstrip()}")
  proc.stdout.close()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = round(time.perf_counter() - t0, 1)
  try:
    out = json.loads(last)
  except json.JSONDecodeError:
    out = {"error": f"exit status {proc.returncode}; last line: {last.strip()[:300]}"}
  if proc.returncode:
    out.setdefault("error", f"exit status {proc.returncode}")
  # Linux reports ru_maxrss in KiB.
  out.update(max_rss_mib=round(usage.ru_maxrss / 1024, 1), process_wall_s=wall)
  return out


def _workload_args(args) -> list[str]:
  out = ["--preset", args.preset, "--iters", str(args.iters), "--warmup", str(args.warmup),
         "--gen-reps", str(args.gen_reps), "--fb-reps", str(args.fb_reps), "--seed", str(args.seed)]
  for k in OVERRIDES:
    if getattr(args, k) is not None:
      out += ["--" + k.replace("_", "-"), str(getattr(args, k))]
  return out + (["--skip-micro"] if args.skip_micro else [])


def ours_cmd(args, critic: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), "--worker", "ours", "--critic", critic,
          "--dtype", args.dtype] + _workload_args(args)


def peer_cmd(args, peak: float | None) -> list[str]:
  py = os.path.join(os.path.abspath(args.peer_venv), "bin", "python")
  cmd = [py, os.path.abspath(args.peer_script)] + _workload_args(args)
  if peak:
    cmd += ["--peak-gflops", str(peak)]
  if args.dtype == "bfloat16":
    cmd.append("--bf16")
  return cmd + args.peer_args.split()


def summarize_ours(runs: list[dict], p: dict, peak, critic: str) -> dict:
  """Pools the measured iterations of all rounds; adds throughput and MFU."""
  ok = [r for r in runs if "error" not in r]
  if not ok:
    return {"error": [r.get("error") for r in runs]}
  iters = [t for r in ok for t in r["iter_times_s"][-r["iters_measured"]:]]
  it = median(iters)
  trl_f, ex_f = trl_flops(p), executed_flops(p, critic)
  out = {
      "critic": critic, "rounds": len(ok), "iter_median_s": round(it, 4),
      "iter_times_s": [r["iter_times_s"] for r in ok],
      "phase_median_s": {k: round(median([r["phase_median_s"][k] for r in ok]), 4)
                         for k in ok[0]["phase_median_s"]},
      "episodes_per_s": round(p["batch"] / it, 3),
      "compile_s": ok[0]["compile_s"], "temp_mib": ok[0].get("temp_mib"),
      "max_rss_mib": max(r["max_rss_mib"] for r in ok),
      "peak_rss_mib_after": [r["peak_rss_mib_after"] for r in ok],
      "metrics_finite": all(r["metrics_finite"] for r in ok),
      "achieved_gflops_executed": gflops(ex_f["per_iteration"]["total"], it),
      "mfu_executed": mfu(ex_f["per_iteration"]["total"], it, peak),
      "phase_gflops_executed": {
          "generation": gflops(ex_f["per_iteration"]["generation"], median(
              [r["phase_median_s"]["generation"] for r in ok])),
          "scoring": gflops(sum(ex_f["per_iteration"][k] for k in ("ref_fwd", "value_fwd",
                                                                   "reward_fwd")),
                            median([r["phase_median_s"]["scoring"] for r in ok])),
          "update": gflops(ex_f["per_iteration"]["ppo_train_fwd_bwd"],
                           median([r["phase_median_s"]["update"] for r in ok]))},
      "params": ok[0]["params"], "versions": ok[0]["versions"], "device": ok[0]["device"],
      "last_metrics": ok[-1]["last_metrics"],
  }
  if critic == "separate":
    # Only the separate-critic run is TRL's workload; its FLOPs formula does not apply otherwise.
    out.update(achieved_gflops=gflops(trl_f["per_iteration"]["total"], it),
               mfu=mfu(trl_f["per_iteration"]["total"], it, peak))
  if "device_peak_mib" in ok[0]:
    out["device_peak_mib"] = max(r["device_peak_mib"] for r in ok)
  if "generation" in ok[0]:
    g = median([r["generation"]["median_s"] for r in ok])
    f = median([r["fwd_bwd"]["median_s"] for r in ok])
    out["generation"] = {"median_s": g, "gen_tokens_per_s": round(p["batch"] * p["response_len"] / g, 2),
                         "mfu": mfu(trl_f["generation_batch"], g, peak),
                         "mfu_executed": mfu(ex_f["generation_batch"], g, peak)}
    out["fwd_bwd"] = {"median_s": f, "tokens_per_s": round(
        p["batch"] * (p["prompt_len"] + p["response_len"]) / f, 2),
        "mfu": mfu(trl_f["fwd_bwd_batch"], f, peak),
        "mfu_executed": mfu(ex_f["fwd_bwd_batch"], f, peak)}
  return out


def summarize_trl(runs: list[dict]) -> dict:
  ok = [r for r in runs if "error" not in r and "ppo" in r]
  if not ok:
    return {"error": [r.get("error", "no ppo result") for r in runs]}
  iters = [t for r in ok for t in r["ppo"]["iter_times_s"][-r["ppo"]["iters_measured"]:]]
  it = median(iters)
  fl = ok[0]["flops"]["per_iteration_flops"]["total"]
  peak = ok[0]["peak_gflops"]
  out = {"rounds": len(ok), "iter_median_s": round(it, 4),
         "iter_times_s": [r["ppo"]["iter_times_s"] for r in ok],
         "phase_median_s": {k: round(median([r["ppo"]["phase_median_s"][k] for r in ok]), 4)
                            for k in ok[0]["ppo"]["phase_median_s"]},
         "episodes_per_s": round(ok[0]["workload"]["batch"] / it, 3),
         "achieved_gflops": gflops(fl, it), "mfu": mfu(fl, it, peak),
         "max_rss_mib": max(r["max_rss_mib"] for r in ok),
         "metrics_finite": all(r["ppo"]["metrics_finite"] for r in ok),
         "torch_threads": ok[0]["torch_threads"], "versions": ok[0]["versions"]}
  if "generation" in ok[0]:
    out["generation"] = {k: median([r["generation"][k] for r in ok])
                         for k in ("median_s", "gen_tokens_per_s")}
    out["generation"]["mfu"] = median([r["generation"]["mfu"] for r in ok])
    out["fwd_bwd"] = {k: median([r["fwd_bwd"][k] for r in ok]) for k in ("median_s", "tokens_per_s")}
    out["fwd_bwd"]["mfu"] = median([r["fwd_bwd"]["mfu"] for r in ok])
  return out


def compare(ours: dict, trl: dict) -> dict:
  """Ratios ours / TRL (time and memory: < 1 is better for us; throughput and MFU: > 1)."""
  if "error" in ours or "error" in trl:
    return {}
  out = {"iteration_time_ours_over_trl": ratio(ours["iter_median_s"], trl["iter_median_s"]),
         "speedup_ours_vs_trl": ratio(trl["iter_median_s"], ours["iter_median_s"]),
         "mfu_ours": ours.get("mfu"), "mfu_trl": trl["mfu"],
         "max_rss_ours_over_trl": ratio(ours["max_rss_mib"], trl["max_rss_mib"])}
  if "generation" in ours and "generation" in trl:
    out["generation_tok_s_ours_over_trl"] = ratio(ours["generation"]["gen_tokens_per_s"],
                                                  trl["generation"]["gen_tokens_per_s"])
    out["fwd_bwd_tok_s_ours_over_trl"] = ratio(ours["fwd_bwd"]["tokens_per_s"],
                                               trl["fwd_bwd"]["tokens_per_s"])
  tp = trl["phase_median_s"]
  trl_phases = {"generation": tp["generation"], "scoring": tp["score_fwd"],
                "update": tp["train_fwd"] + tp["train_bwd"] + tp["optimizer"]}
  out["phase_time_ours_over_trl"] = {k: ratio(ours["phase_median_s"][k], x)
                                     for k, x in trl_phases.items()}
  return out


def report(res: dict) -> None:
  """Human-readable summary on stderr."""
  def row(name, s):
    if "error" in s:
      return f"  {name:20s} ERROR {s['error']}"
    gen = s.get("generation", {}).get("gen_tokens_per_s")
    fb = s.get("fwd_bwd", {}).get("tokens_per_s")
    return (f"  {name:20s} iter {s['iter_median_s']:8.3f} s  MFU {s.get('mfu')} "
            f"(executed {s.get('mfu_executed')})  "
            f"gen {gen} tok/s  fwd+bwd {fb} tok/s  RSS {s['max_rss_mib']} MiB  "
            f"phases {s['phase_median_s']}")
  log(f"[summary] preset {res['preset']} {res['dtype']}, peak {res['peak_gflops']} GFLOP/s")
  for name in ("ours", "ours_shared_critic", "trl"):
    if name in res:
      log(row(name, res[name]))
  for name in ("ratios", "ratios_shared_critic"):
    if res.get(name):
      log(f"  {name}: {json.dumps(res[name])}")


def orchestrate(args) -> int:
  p = workload(args)
  res = {"bench": "rlhf_jax_ppo_bench", "preset": args.preset, "workload": p, "dtype": args.dtype,
         "overrides": {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None},
         "host": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "machine": platform.machine()},
         "flops": {"trl_formula": trl_flops(p),
                   "executed": executed_flops(p, "separate")}}
  if args.peak_gflops:
    res["peak"] = {"given": args.peak_gflops}
    peak = args.peak_gflops
  else:
    res["peak"] = run_child([sys.executable, os.path.abspath(__file__), "--worker", "peak",
                             "--dtype", args.dtype, "--peak-sizes", args.peak_sizes,
                             "--peak-reps", str(args.peak_reps)], "peak", False)
    peak = max(res["peak"].get("numpy_gflops", 0), res["peak"].get("jax_gflops", 0)) or None
  res["peak_gflops"] = peak
  log(f"[peak] peak_gflops = {peak}")

  runs = {"ours": [], "trl": [], "ours_shared_critic": []}
  for rnd in range(args.rounds):
    log(f"[round {rnd + 1}/{args.rounds}]")
    runs["ours"].append(run_child(ours_cmd(args, "separate"), "ours", False))
    if args.peer_venv:
      runs["trl"].append(run_child(peer_cmd(args, peak), "trl", True))
    if args.shared_critic:
      runs["ours_shared_critic"].append(run_child(ours_cmd(args, "shared"), "ours-shared", False))

  res["ours"] = summarize_ours(runs["ours"], p, peak, "separate")
  if args.shared_critic:
    res["ours_shared_critic"] = summarize_ours(runs["ours_shared_critic"], p, peak, "shared")
    res["ours_shared_critic"]["note"] = "value head on the policy trunk: less work, not TRL's workload"
    res["flops"]["executed_shared_critic"] = executed_flops(p, "shared")
  if args.peer_venv:
    res["trl"] = summarize_trl(runs["trl"])
    res["ratios"] = compare(res["ours"], res["trl"])
    if args.shared_critic:
      res["ratios_shared_critic"] = compare(res["ours_shared_critic"], res["trl"])
  res["rounds"] = args.rounds
  report(res)
  line = json.dumps(res)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)
  failed = [k for k in ("ours", "ours_shared_critic", "trl") if "error" in res.get(k, {})]
  return 1 if failed else 0


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def workload(args) -> dict:
  p = dict(PRESETS[args.preset])
  p.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
  return p


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  ap.add_argument("--iters", type=int, default=5, help="PPO iterations per process")
  ap.add_argument("--warmup", type=int, default=1, help="first iterations left out of the median")
  ap.add_argument("--gen-reps", type=int, default=3, help="timed generation calls after a warm-up")
  ap.add_argument("--fb-reps", type=int, default=3, help="timed fwd+bwd calls after a warm-up")
  ap.add_argument("--skip-micro", action="store_true", help="no generation / fwd+bwd alone")
  ap.add_argument("--rounds", type=int, default=1, help="alternating rounds: ours, TRL, ours, ...")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype (params stay float32); bfloat16 turns on TRL's --bf16")
  ap.add_argument("--shared-critic", action="store_true",
                  help="also run critic='shared' (reported separately: less work)")
  ap.add_argument("--seed", type=int, default=0)
  for k in OVERRIDES:
    ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, dest=k,
                    help="shrink the preset (recorded under overrides; passed to TRL too)")
  ap.add_argument("--peak-gflops", type=float, default=None, help="skip the peak measurement")
  ap.add_argument("--peak-sizes", default="1024,2048,3072,4096")
  ap.add_argument("--peak-reps", type=int, default=5)
  ap.add_argument("--peer-venv", default=None, help="venv with TRL; runs the peer side by side")
  ap.add_argument("--peer-script", default="../shared/peers/trl_ppo_baseline.py")
  ap.add_argument("--peer-args", default="", help="extra arguments for the peer script")
  ap.add_argument("--out", default=None, help="also write the JSON line to this file")
  ap.add_argument("--worker", choices=("ours", "peak"), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--critic", choices=("separate", "shared"), default="separate",
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  for name in ("iters", "gen_reps", "fb_reps", "rounds", "peak_reps"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0:
    ap.error(f"--warmup must be >= 0, got {args.warmup}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker == "peak":
    print(json.dumps(worker_peak(args)), flush=True)
    return 0
  if args.worker == "ours":
    print(json.dumps(worker_ours(args, workload(args))), flush=True)
    return 0
  return orchestrate(args)


if __name__ == "__main__":
  sys.exit(main())
