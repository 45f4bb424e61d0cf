"""Run outputs: metrics.jsonl, TensorBoard event files, PNG curves, and a progress line with ETA.

Only process 0 writes (multi-host runs share one workdir). Every record is one JSON object per
line with at least a `step` key, flushed as written so a killed run keeps what it logged.
"""

import io
import json
import math
import os
import time
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging

from rlhf_jax import fileio


def _to_python(v: Any):
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


class MetricsWriter:
  """Appends metric records to `<workdir>/<name>.jsonl` and TensorBoard under `<workdir>/tb/<name>`."""

  def __init__(self, workdir: str, name: str = "metrics", tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._tb = None
    self.num_records = 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a")
    self.num_records = _count_lines(self.path)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb", name))

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    if not self.enabled:
      return record
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    self.num_records += 1
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    return record

  def truncate(self, num_records: int) -> None:
    """Keeps the first `num_records` records: a resumed run drops what was logged after its
    checkpoint (including a line cut short by a kill), so no step appears twice."""
    if not self.enabled or num_records >= self.num_records:
      return
    self._file.close()
    with open(self.path) as f:
      kept = [line for line, _ in zip(f, range(num_records))]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self.num_records = num_records

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _count_lines(path: str) -> int:
  with open(path, "rb") as f:
    return sum(1 for _ in f)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


Panel = str | tuple[str, str]


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
  return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _draw_panel(ax, records: list[dict[str, Any]], panel: Panel, flag_key: str | None) -> list:
  """One key on `ax`, or two on twin y-axes (left, right) in distinct colours; vertical red lines
  at the steps where `flag_key` is truthy. Returns the y-axes, one per key."""
  keys = (panel,) if isinstance(panel, str) else panel
  axes = [ax] + [ax.twinx() for _ in keys[1:]]
  for i, (a, key) in enumerate(zip(axes, keys)):
    pts = _points(records, key)
    if not pts:
      continue
    color = f"C{i}"
    a.plot([p[0] for p in pts], [p[1] for p in pts], color=color,
           marker="." if len(pts) < 50 else None, label=key)
    if len(keys) > 1:
      a.set_ylabel(key, color=color)
      a.tick_params(axis="y", colors=color)
  flagged = [p[0] for p in _points(records, flag_key) if p[1]] if flag_key else []
  for j, step in enumerate(flagged):
    ax.axvline(step, color="red", alpha=0.4, lw=1, label=flag_key if j == 0 else None)
  if flagged:
    ax.legend(loc="lower right", fontsize="small")
  ax.set_title(" / ".join(keys))
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  return axes


def _save(fig, out_png: str, title: str) -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=90, format="png")
  return fileio.write_atomic(out_png, buf.getvalue())   # a reader never sees half an image


def plot_curves(records: Iterable[dict[str, Any]], panels: list[Panel], out_png: str,
                title: str = "", flag_key: str | None = None) -> str | None:
  """One panel per entry of `panels` (those with data) against `step`: a key, or a pair of keys
  sharing the panel on two y-axes (e.g. the reward-model score and the gold score). Steps where
  `flag_key` is truthy are marked on every panel. Returns the PNG path, or None without data."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = list(records)
  panels = [p for p in panels
            if any(_points(records, k) for k in ((p,) if isinstance(p, str) else p))]
  if not panels:
    return None
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    _draw_panel(ax, records, panel, flag_key)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  out = _save(fig, out_png, title)
  plt.close(fig)
  return out


def plot_runs(runs: dict[str, list[dict[str, Any]]], panel: Panel, out_png: str,
              title: str = "", flag_key: str | None = None) -> str:
  """The same panel for several runs side by side, one column per run titled by its name (e.g.
  the default run and the `hacking` variant's reward-model and gold scores), each key on the same
  y-range in every column so the runs compare at a glance. Returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not runs:
    raise ValueError("plot_runs needs at least one run")
  fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs), 3.4), squeeze=False)
  drawn = []
  for ax, (name, records) in zip(axes.flat, runs.items()):
    drawn.append(_draw_panel(ax, list(records), panel, flag_key))
    ax.set_title(name)
  for same_key in zip(*drawn):
    limits = [a.get_ylim() for a in same_key]
    for a in same_key:
      a.set_ylim(min(lo for lo, _ in limits), max(hi for _, hi in limits))
  out = _save(fig, out_png, title)
  plt.close(fig)
  return out


class Progress:
  """Logs `step/total`, rate and ETA at most every `every_s` seconds."""

  def __init__(self, total: int, name: str, every_s: float = 10.0):
    self.total, self.name, self.every_s = total, name, every_s
    self.start = time.time()
    self.last = 0.0

  def update(self, step: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    done = max(step, 1)
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    logging.info("[%s] %d/%d  %.2f it/s  ETA %s  %s", self.name, step, self.total, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?", extra)
