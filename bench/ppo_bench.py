"""PPO benchmark of rlhf_jax, side by side with Hugging Face TRL on the same workload.

The workloads are TRL's `tiny` and `small` presets (shared/reference/trl_ppo_cpu.md): random-init
GPT-2 shapes, a policy, its reference copy, a separate value model and a separate reward model
(each a ScalarModel with its own random init), random prompt ids in [3, V), temperature 0.7, no stop
token (every response has exactly R tokens), B prompts per iteration, num_minibatches = B / mb,
one AdamW step per minibatch (lr 3e-6, linear decay, no weight decay, no gradient clipping), KL
k1 with coefficient 0.05 in the reward, cliprange 0.2 (policy and value), vf_coef 0.1, GAE with
gamma 1 and lambda 0.95, float32.

Each framework runs in a process of its own, so its max RSS is that framework's. What rlhf_jax's
process times is in bench/workers.py; the FLOP counts behind `mfu` (TRL's formula, so the two
frameworks' MFU compare) and `mfu_executed` (what our programs run) are in bench/flops.py.
Peak: square float32 matmuls with numpy and jnp.dot, measured in the same run (the max is the
peak); it is handed to the TRL run too, so both MFUs use one denominator.

Usage (from the repository root):
  python bench/ppo_bench.py --preset tiny --iters 5
  python bench/ppo_bench.py --preset tiny --iters 5 --rounds 2 \
      --peer-venv .venv-peer-trl --peer-script ../shared/peers/trl_ppo_baseline.py
Progress goes to stderr; the last line on stdout is one JSON object with every number.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from flops import executed_flops, trl_flops
from summary import compare, report, summarize_ours, summarize_trl
from workload import OVERRIDES, PRESETS, log, workload


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
    res["ours_shared_critic"]["note"] = (
        "value head on the policy trunk: less work, not TRL's workload")
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
  if args.worker is None:
    return orchestrate(args)
  # The rlhf_jax timed is the one of the checkout this file is in, not the one the venv's editable
  # install points to (a worktree's run would otherwise time another tree).
  sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))
  # Imported here only: the orchestrator starts processes and never runs jax itself.
  import workers
  if args.worker == "peak":
    out = workers.worker_peak(args)
  else:
    out = workers.worker_ours(args, workload(args))
  print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
