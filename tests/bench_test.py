"""bench/: FLOP counts against TRL's published figures, the CLI's checks, shrunk end-to-end runs."""

import importlib
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "bench"
BENCH = BENCH_DIR / "ppo_bench.py"
MODULES = ("bucketing", "flops", "ppo_bench", "summary", "workload")


@pytest.fixture(scope="module")
def bench():
  """bench/ holds scripts, not a package: its modules import each other by name, as they do when
  `python bench/ppo_bench.py` puts bench/ first on sys.path; so the fixture does the same."""
  sys.path.insert(0, str(BENCH_DIR))
  try:
    yield types.SimpleNamespace(**{name: importlib.import_module(name) for name in MODULES})
  finally:
    sys.path.remove(str(BENCH_DIR))
    for name in MODULES:
      sys.modules.pop(name, None)


# GFLOP per iteration from shared/reference/trl_ppo_cpu.md (TRL's own count, one decimal).
TRL_GFLOP = {
    "tiny": {"generation": 34.5, "ref_fwd": 43.5, "value_fwd": 26.3, "reward_fwd": 26.3,
             "ppo_train_fwd_bwd": 837.7, "total": 968.4},
    "small": {"generation": 429.0, "ref_fwd": 510.9, "value_fwd": 352.8, "reward_fwd": 352.8,
              "ppo_train_fwd_bwd": 2590.9, "total": 4236.3},
}


@pytest.mark.parametrize("preset", sorted(TRL_GFLOP))
def test_trl_formula_reproduces_trls_published_flops(bench, preset):
  counted = bench.flops.trl_flops(bench.workload.PRESETS[preset])["per_iteration"]
  for phase, gflop in TRL_GFLOP[preset].items():
    assert counted[phase] / 1e9 == pytest.approx(gflop, abs=0.051), phase


def test_shared_critic_executes_less_training_work(bench):
  p = bench.workload.PRESETS["tiny"]
  separate = bench.flops.executed_flops(p, "separate")["per_iteration"]
  shared = bench.flops.executed_flops(p, "shared")["per_iteration"]
  assert shared["ppo_train_fwd_bwd"] < separate["ppo_train_fwd_bwd"]
  assert {k: v for k, v in shared.items() if k not in ("ppo_train_fwd_bwd", "total")} == {
      k: v for k, v in separate.items() if k not in ("ppo_train_fwd_bwd", "total")}


def test_shrunk_run_prints_one_json_line(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, str(BENCH), "--preset", "tiny", "--n-layer", "1", "--batch", "4",
         "--mini-batch", "2", "--ppo-epochs", "1", "--prompt-len", "4", "--response-len", "4",
         "--iters", "2", "--warmup", "1", "--skip-micro", "--peak-gflops", "100",
         "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res == json.loads(out.read_text())
  ours = res["ours"]
  assert res["overrides"] == {"n_layer": 1, "batch": 4, "mini_batch": 2, "ppo_epochs": 1,
                              "prompt_len": 4, "response_len": 4}
  assert ours["metrics_finite"] and ours["iter_median_s"] > 0
  assert set(ours["phase_median_s"]) == {"collect", "update", "other"}
  assert 0 < ours["mfu"] < 1 and ours["max_rss_mib"] > 0
  assert set(ours["peak_rss_mib_after"][0]) == {"built", "compiled", "ppo"}
  assert "trl" not in res


@pytest.mark.parametrize("flag,value", [("--iters", "0"), ("--warmup", "-1"), ("--rounds", "0")])
def test_counts_out_of_range_are_refused(bench, flag, value, capsys):
  with pytest.raises(SystemExit) as exc:
    bench.ppo_bench.parse_args([flag, value])
  assert exc.value.code == 2
  assert f"{flag} must be" in capsys.readouterr().err


def test_bucketing_pairs_have_hh_like_lengths_within_max_tokens(bench):
  lengths = bench.bucketing.pair_lengths(2312, 160.0, 0.7, 1300, seed=0)
  rows = lengths[:, 0] + lengths[:, 1:].max(axis=1) + 1   # prompt + longer reply + EOS
  assert lengths.min() >= 1 and rows.max() <= 1300
  assert 140 <= np.median(rows) <= 180 and 600 <= np.percentile(rows, 99) <= 1000


def test_bucketing_shrunk_run_prints_one_json_line(tmp_path):
  out = tmp_path / "bucketing.json"
  cmd = [sys.executable, str(BENCH_DIR / "bucketing.py"), "--pairs", "48", "--median", "12",
         "--max-tokens", "40", "--batch", "8", "--micro-batch", "4", "--buckets", "3", "--layers", "1", "--width", "16",
         "--modes", "fixed,bucket", "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res == json.loads(out.read_text())
  fixed, bucket = res["modes"]["fixed"], res["modes"]["bucket"]
  assert fixed["steps"] == bucket["steps"] == 6 and fixed["widths"] == [40]
  assert len(bucket["widths"]) <= 3 and bucket["padding_fraction"] < fixed["padding_fraction"]
  assert set(res["speedup_over_fixed"]) == {"bucket"}


@pytest.mark.parametrize("flag,value", [("--pairs", "0"), ("--width", "24"), ("--modes", "a,b")])
def test_bucketing_bad_arguments_are_refused(bench, flag, value, capsys):
  with pytest.raises(SystemExit) as exc:
    bench.bucketing.parse_args([flag, value])
  assert exc.value.code == 2
  assert flag in capsys.readouterr().err
