"""Run-level faults: preemption signals and runs of non-finite iterations.

Preemption: SIGTERM (what schedulers and spot/preemptible VMs send before killing) and SIGINT
(Ctrl-C) only set a flag; the training loop finishes the iteration in flight, writes a checkpoint
and raises `Preempted`, which the experiment mains turn into exit status 128 + signal number (143
for SIGTERM, 130 for SIGINT), the status a shell reports for a process killed by that signal, so
job schedulers requeue it; the rerun resumes from the checkpoint. A second SIGINT aborts at once.
"""

import math
import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after checkpointing `step`.

  Attributes:
    step: The step of the final checkpoint.
    signum: The signal received (0 when another process received it).
    exit_code: 128 + signum (143 for SIGTERM), or 143 when the signal was seen elsewhere.
  """

  def __init__(self, step: int, signum: int, directory: str | None):
    self.step, self.signum = step, signum
    self.exit_code = 128 + (signum or int(signal.SIGTERM))
    name = signal.Signals(signum).name if signum else "a signal on another process"
    saved = (f"checkpoint written to {directory}; rerun the same command to resume" if directory
             else "checkpointing is off, so a rerun starts over")
    super().__init__(f"preempted by {name}: stopped after step {step}, {saved}")


class PreemptionHandler:
  """Context manager turning SIGTERM/SIGINT into a flag the training loop polls between iterations.

  Handlers are installed only in the main thread (Python allows no other); elsewhere the handler is
  inert. `requested()` agrees across processes, so every host stops after the same step and the
  final checkpoint's collective save cannot deadlock.
  """

  def __init__(self):
    self.signum = 0
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    logging.warning("received %s: finishing the current iteration, then checkpointing and "
                    "stopping", signal.Signals(signum).name)
    self.signum = signum
    # Restoring the previous handlers makes a second Ctrl-C (or SIGTERM) act at once.
    self._restore()

  def _restore(self):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def __enter__(self) -> "PreemptionHandler":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in PREEMPTION_SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def requested(self) -> bool:
    """Whether any process received a preemption signal (a collective when multi-process)."""
    if jax.process_count() == 1:
      return bool(self.signum)
    flags = multihost_utils.process_allgather(np.int32(self.signum > 0))
    return bool(np.asarray(flags).any())


class NonfiniteGuard:
  """Stops a run after `max_iterations` consecutive iterations (PPO) or steps (the supervised
  loop: `unit`) with numerical faults; the error ends with `advice`.

  An iteration is faulty when its reward mean is not finite or `ppo_update` skipped minibatch
  steps whose loss or gradient was not finite (`nonfinite_steps` > 0). Skipped steps leave the
  parameters unchanged, so isolated faults (one bad batch) are survivable; a run of them means the
  model or reward is broken and continuing only burns compute.
  """

  def __init__(self, max_iterations: int, streak: int = 0, unit: str = "iterations",
               advice: str = "Lower the learning rate, check the reward model's outputs, or use "
                             "float32"):
    if max_iterations < 1:
      raise ValueError(f"max_nonfinite_{unit} must be >= 1, got {max_iterations}")
    self.max_iterations = max_iterations
    self.streak = streak
    self.unit, self.advice = unit, advice

  def update(self, step: int, record: dict[str, Any]) -> None:
    """Counts `record` (the metrics of iteration `step`); raises FloatingPointError at the limit."""
    reward = record.get("reward_mean", 0.0)
    skipped = record.get("nonfinite_steps", 0.0)
    faults = []
    if not math.isfinite(reward):
      faults.append(f"reward_mean={reward}")
    if skipped:
      faults.append(f"{int(skipped)} minibatch steps skipped for non-finite loss or gradient")
    if not faults:
      self.streak = 0
      return
    self.streak += 1
    logging.warning("step %d: %s (%d consecutive faulty %s of %d allowed)", step,
                    ", ".join(faults), self.streak, self.unit, self.max_iterations)
    if self.streak >= self.max_iterations:
      raise FloatingPointError(
          f"non-finite values in {self.streak} consecutive {self.unit} (steps "
          f"{step - self.streak + 1}-{step}); at step {step}: {', '.join(faults)}. {self.advice}")
