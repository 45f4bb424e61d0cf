"""Checkpoints of the supervised loop (`supervised.fit`): what a killed or preempted SFT,
reward-model or DPO run needs to continue bitwise.

A checkpoint at step k holds params and optimizer state (`checkpointing.Checkpointer`: Orbax,
asynchronous, the newest `keep_checkpoints` kept, another run's refused by config fingerprint)
and, as metadata, the loop's host state: k, the non-finite streak and total, the number of
metrics records written (a resumed run drops those logged after the checkpoint, so none appears
twice) and the last history entry. The data order needs no state: the step sequence is a pure
function of (seed, epoch), so the resumed loop skips its first k steps.
"""

from typing import Any

from absl import logging

from rlhf_jax import checkpointing
from rlhf_jax.metrics import MetricsWriter

# TrainerConfig fields a run may change between a save and its resumption (cadences); any other
# change makes the checkpoint another run's.
RESUMABLE_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "max_nonfinite_steps")


class LoopCheckpoints:
  """Saves and restores (params, opt_state) plus the loop's host state under `directory`.

  Args:
    directory: The checkpoint directory (created on the first save).
    cfg: The loop's TrainerConfig (or a subclass): cadence, retention, and the fingerprint.
    writer: The MetricsWriter the loop's `log_fn` writes to, kept in step with the checkpoints.
  """

  def __init__(self, directory: str, cfg: Any, writer: MetricsWriter | None = None):
    self.checkpointer = checkpointing.Checkpointer(
        directory, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
        fingerprint=checkpointing.config_fingerprint(cfg, RESUMABLE_FIELDS))
    self.writer = writer

  @property
  def directory(self) -> str:
    return self.checkpointer.directory

  def restore(self, params: Any, opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(params, opt_state, host state) of the newest checkpoint, or the arguments and {} without
    one. The writer keeps only the records logged up to the checkpoint (none without one)."""
    restored = self.checkpointer.restore({"params": params, "opt_state": opt_state})
    meta = restored[1] if restored is not None else {}
    if self.writer is not None:
      self.writer.truncate(meta.get("num_records", 0))
    if restored is None:
      return params, opt_state, {}
    logging.info("resuming from checkpoint %s/%d", self.directory, meta["step"])
    return restored[0]["params"], restored[0]["opt_state"], meta

  def due(self, step: int) -> bool:
    return self.checkpointer.should_save(step)

  def save(self, step: int, params: Any, opt_state: Any, force: bool = False,
           **host_state) -> None:
    """Starts an asynchronous save of step `step` when due (or forced)."""
    meta = {"num_records": self.writer.num_records if self.writer is not None else 0,
            **host_state}
    self.checkpointer.save(step, {"params": params, "opt_state": opt_state}, meta, force=force)

  def close(self) -> None:
    """Waits for pending saves, then releases the checkpointer."""
    self.checkpointer.wait()
    self.checkpointer.close()
