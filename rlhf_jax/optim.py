"""Optax optimizers built from a typed config."""

import dataclasses
import math

import optax

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping and a learning-rate schedule.

  Attributes:
    learning_rate: Peak learning rate.
    schedule: "constant", "linear" (decay to 0 over total_steps, as in the OpenAI
      lm-human-preferences PPO) or "cosine".
    warmup_steps: Linear warm-up from 0 before the schedule.
    total_steps: Optimizer steps the schedule spans (minibatch steps, not iterations); None: the
      run's own step count, filled in by the trainer.
    weight_decay: Decoupled weight decay (Loshchilov & Hutter 2019).
    b1, b2, eps: Adam moments; eps 1e-5 follows the N implementation details of PPO.
    max_grad_norm: Clip the global gradient norm to this (0: off).
  """
  learning_rate: float = 1e-5
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int | None = None
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-5
  max_grad_norm: float = 1.0

  def __post_init__(self):
    # A NaN learning rate trains silently into NaN weights; reject every value the update
    # cannot use before anything runs.
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.total_steps is not None and self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1 or unset, got {self.total_steps}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"eps must be finite and > 0, got {self.eps}")
    if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
      raise ValueError(f"max_grad_norm must be finite and >= 0 (0: off), got "
                       f"{self.max_grad_norm}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  if cfg.total_steps is None and (cfg.schedule != "constant" or cfg.warmup_steps > 0):
    raise ValueError(f"schedule {cfg.schedule!r} needs OptimConfig.total_steps")
  decay_steps = max((cfg.total_steps or 0) - cfg.warmup_steps, 1)
  main = {"constant": lambda: optax.constant_schedule(cfg.learning_rate),
          "linear": lambda: optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
          "cosine": lambda: optax.cosine_decay_schedule(cfg.learning_rate, decay_steps),
          }[cfg.schedule]()
  if cfg.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule)."""
  parts = []
  if cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)
