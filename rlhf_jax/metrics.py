"""Run outputs: metrics.jsonl, TensorBoard event files, PNG curves, and a progress line with ETA.

Only process 0 writes (multi-host runs share one workdir). Every record is one JSON object per
line with at least a `step` key, flushed as written so a killed run keeps what it logged.
"""

import json
import math
import os
import time
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging


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


def plot_curves(records: Iterable[dict[str, Any]], keys: list[str], out_png: str,
                title: str = "") -> str | None:
  """One panel per key (those present) against `step`; returns the PNG path or None."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = list(records)
  keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
  if not keys:
    return None
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)
  return out_png


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
