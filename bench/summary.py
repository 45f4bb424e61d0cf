"""The JSON result's summaries: each framework's runs pooled into one record with throughput and
MFU, the ratios ours / TRL, and the human-readable lines on stderr."""

import json

from flops import executed_flops, gflops, mfu, trl_flops
from workload import log, median


def ratio(a, b):
  return round(a / b, 4) if a is not None and b else None


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
          "collect": gflops(sum(ex_f["per_iteration"][k] for k in (
              "generation", "ref_fwd", "value_fwd", "reward_fwd")),
              median([r["phase_median_s"]["collect"] for r in ok])),
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
    out["generation"] = {"median_s": g,
                         "gen_tokens_per_s": round(p["batch"] * p["response_len"] / g, 2),
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
    out["fwd_bwd"] = {k: median([r["fwd_bwd"][k] for r in ok])
                      for k in ("median_s", "tokens_per_s")}
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
  # Our collect is one program: TRL's generation and scoring together.
  trl_phases = {"collect": tp["generation"] + tp["score_fwd"],
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

