"""Optax optimizers built from a typed config."""

import dataclasses

import optax


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


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  if cfg.total_steps is None and (cfg.schedule != "constant" or cfg.warmup_steps > 0):
    raise ValueError(f"schedule {cfg.schedule!r} needs OptimConfig.total_steps")
  decay_steps = max((cfg.total_steps or 0) - cfg.warmup_steps, 1)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
  else:
    raise ValueError(f"unknown schedule {cfg.schedule!r} (constant, linear, cosine)")
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
