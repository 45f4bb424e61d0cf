"""Supervised trainers and the training loop they share.

`rlhf_jax.trainers.sft.train_sft` (supervised fine-tuning) and
`rlhf_jax.trainers.reward.train_reward_model` (Bradley-Terry reward model) each supply a pure loss
on a batch of right-padded [B, L] arrays; `fit` runs it: one jitted step
`(params, opt_state, batch) -> (params, opt_state, metrics)` over `nnx.split` params with params and
optimizer state donated (its gradient optionally accumulated over microbatches), deterministic
per-epoch shuffles, each batch trimmed to one of a few widths (`data.batching`: one compilation
per width), optional mesh placement (params by their logical axes, batch rows over the
batch axes), held-out evaluation and a `log_fn(step, metrics)` callback. The Python loop only
feeds batches; metrics are fetched once per logging window. Steps with a non-finite loss or
gradient are skipped and counted, a run of them stops the loop (`faults.NonfiniteGuard`); with a
checkpoint directory the loop checkpoints periodically and on SIGTERM / SIGINT and resumes bitwise
(`resume.LoopCheckpoints`).
"""

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import faults
from rlhf_jax import microbatch
from rlhf_jax import optim as optim_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import batching
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.trainers import resume

Batch = dict[str, np.ndarray]
Metrics = dict[str, float]
LogFn = Callable[[int, Metrics], None]
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
CountFn = Callable[[Mapping[str, jax.Array]], jax.Array]
EvalFn = Callable[[nnx.State], Metrics]

# The train/eval split's random stream of the config seed (the shuffles draw
# batching.SHUFFLE_STREAM).
_SPLIT_STREAM = 0
_NONFINITE_ADVICE = ("Lower the learning rate, check the data for empty or broken rows, or use "
                     "float32")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Fields shared by the supervised trainers.

  Attributes:
    batch_size: Rows (examples or preference pairs) per optimizer step; a multiple of the mesh's
      batch-axes size. Also the evaluation batch size.
    epochs: Passes over the training split; each drops its last incomplete batch (fixed batch
      shapes).
    max_len: Token width of every encoded row: prompt + completion + EOS, right padded. Prompts
      are left-truncated to fit; a completion that does not fit raises (see `drop_overlong`).
    optim: Optimizer. An unset `total_steps` becomes the run's step count, so a decaying
      schedule spans exactly the run.
    seed: Seed of the train/eval split and of the per-epoch shuffles.
    eval_fraction: Share of the examples held out for evaluation when no evaluation set is
      passed (0: no evaluation).
    eval_every: Evaluate every this many steps; 0: only after the last step.
    log_every: Fetch metrics and call `log_fn` every this many steps (and after the last).
    drop_overlong: Drop examples whose completion exceeds max_len instead of raising DataError.
    micro_batch_size: Rows per forward/backward pass inside an optimizer step (None: the whole
      batch at once); must divide batch_size. The step's gradient is summed over the
      microbatches, each scaled by its share of the loss's normalizer, so it is the unsplit
      step's (see `make_train_step`).
    length_buckets: Most widths a batch is trimmed to (`batching.bucket_widths`: the ones that
      pad the training rows least), so the step compiles at most this many times; each batch,
      training or evaluation, is cut to the smallest width holding its longest row. 1: every
      batch is max_len wide.
    group_by_length: Draw each training batch from rows of one width (then shuffle the batches'
      order; `batching.epoch_plan`): the least padding on long-tailed lengths, but batches other
      than the plain shuffle's. False: the plain shuffle's batches, only trimmed (the same
      updates up to float rounding).
    checkpoint_every: With a checkpoint directory (`fit`), save params, optimizer state and the
      loop position every this many steps (0: only on SIGTERM / SIGINT); a rerun resumes from
      the newest checkpoint bitwise.
    keep_checkpoints: Newest checkpoints kept.
    max_nonfinite_steps: Stop (FloatingPointError naming the step) after this many consecutive
      steps whose loss or gradient was not finite; each such step is skipped, params and
      optimizer state unchanged.
  """
  batch_size: int = 32
  epochs: int = 1
  max_len: int = 512
  optim: optim_lib.OptimConfig = optim_lib.OptimConfig()
  seed: int = 0
  eval_fraction: float = 0.05
  eval_every: int = 0
  log_every: int = 10
  drop_overlong: bool = False
  micro_batch_size: int | None = None
  length_buckets: int = 8
  group_by_length: bool = False
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  max_nonfinite_steps: int = 3

  def __post_init__(self):
    for name in ("batch_size", "epochs", "max_len", "log_every", "length_buckets",
                 "keep_checkpoints", "max_nonfinite_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "seed", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
    if self.micro_batch_size is not None and (
        self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
      raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide "
                       f"batch_size={self.batch_size}")


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic (train rows, eval rows): round(n * eval_fraction) random rows held out (at
  least one when eval_fraction > 0), both sorted."""
  n_eval = int(round(n * eval_fraction))
  if eval_fraction > 0:
    n_eval = max(n_eval, 1)
  if n_eval >= n:
    raise ValueError(f"eval_fraction={eval_fraction} leaves no training rows out of {n}")
  perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
  return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def take_rows(arrays: Batch, rows: np.ndarray) -> Batch:
  return {k: v[rows] for k, v in arrays.items()}


def num_rows(arrays: Batch) -> int:
  return next(iter(arrays.values())).shape[0]


def check_vocab(arrays: Batch, vocab_size: int) -> None:
  """Raises ValueError if a token id in any "*ids" array is outside the model's vocabulary (an
  embedding lookup would silently clamp it)."""
  for key, value in arrays.items():
    if key.endswith("ids") and value.size and int(value.max()) >= vocab_size:
      raise ValueError(f"{key} holds token id {int(value.max())} but the model's vocab_size is "
                       f"{vocab_size}: tokenizer and model do not match (resize the embeddings)")


def train_eval_arrays(encode: Callable[[Sequence[Any]], Batch], items: Sequence[Any],
                      eval_items: Sequence[Any] | None, cfg: TrainerConfig,
                      vocab_size: int) -> tuple[Batch, Batch]:
  """(train, held-out) arrays: `encode(items)` split by `split_indices`, or all of it for training
  and `encode(eval_items)` held out when those are given. Both are checked against the vocab."""
  arrays = encode(items)
  if eval_items is None:
    train_rows, eval_rows = split_indices(num_rows(arrays), cfg.eval_fraction, cfg.seed)
    train, held_out = take_rows(arrays, train_rows), take_rows(arrays, eval_rows)
  else:
    train, held_out = arrays, encode(eval_items)
  check_vocab(train, vocab_size)
  check_vocab(held_out, vocab_size)
  return train, held_out


def _batch_divisor(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape.get(a, 1) for a in dict(sharding_lib.DEFAULT_RULES)["batch"]]))


def put_batch(batch: Batch, mesh: Mesh | None) -> dict[str, jax.Array]:
  """Host arrays to device: rows split over the mesh's batch axes, or onto the default device."""
  if mesh is None:
    return jax.device_put(batch)
  return {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}


def eval_batches(arrays: Batch, batch_size: int,
                 widths: Sequence[int] | None = None) -> Iterator[Batch]:
  """Consecutive batches of `batch_size` rows in order; the last is padded with all-zero rows
  (zero masks, so they count nowhere; callers drop their rows by position). With `widths`, each
  batch is trimmed to the smallest of them holding its rows (`batching.width_of`)."""
  n = num_rows(arrays)
  lengths = None if widths is None else batching.row_lengths(arrays)
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    batch = take_rows(arrays, rows)
    if widths is not None:
      batch = batching.trim(batch, batching.width_of(lengths[rows], widths))
    pad = batch_size - num_rows(batch)
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch


def map_batches(fn: Callable[[nnx.State, dict[str, jax.Array]], Any], params: nnx.State,
                arrays: Batch, batch_size: int, mesh: Mesh | None,
                length_buckets: int = 1) -> list[Any]:
  """Host copies of `fn(params, batch)` for the `eval_batches` of `arrays`, in order, trimmed to
  at most `length_buckets` widths (`batching.bucket_widths` of these rows; 1: untrimmed)."""
  widths = batching.bucket_widths(batching.row_lengths(arrays), length_buckets,
                                  batching.full_width(arrays))
  outputs = [fn(params, put_batch(b, mesh)) for b in eval_batches(arrays, batch_size, widths)]
  return jax.device_get(outputs)


def count_rows(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The normalizer of a loss that is a mean over the batch's rows."""
  return jnp.asarray(num_rows(batch), jnp.float32)


def make_train_step(loss_fn: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    micro_batch_size: int | None = None, count_fn: CountFn = count_rows):
  """The pure step `(params, opt_state, batch) -> (params, opt_state, metrics)`.

  One gradient of `loss_fn(nnx.merge(graphdef, params), batch) -> (loss, aux)` and one optimizer
  update; metrics are aux plus "loss", the pre-clipping "grad_norm" and "nonfinite_steps" (1.0
  when the loss or gradient was not finite: then params and optimizer state are returned
  unchanged, as `ppo_update` does for a minibatch).

  With `micro_batch_size`, the gradient is summed over microbatches of that many rows
  (`microbatch.accumulate`). The loss must be a mean over the `count_fn(batch)` rows or tokens of
  its batch, sum_i f_i / n; microbatch k's loss and aux are then scaled by its share n_k / n, which
  sums to the whole batch's loss and aux means exactly. Aux entries named "num_*" are counts and
  are summed unscaled.
  """
  def micro_grads(params, micro, total):
    share = count_fn(micro) / jnp.maximum(total, 1.0)

    def objective(p):
      loss, aux = loss_fn(nnx.merge(graphdef, p), micro)
      return share * loss, {k: v if k.startswith("num_") else share * v for k, v in aux.items()}
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, dict(aux, loss=loss)

  def step(params, opt_state, batch):
    total = count_fn(batch)
    grads, metrics = microbatch.accumulate(lambda p, m: micro_grads(p, m, total), params, batch,
                                           micro_batch_size)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    # A branch, not a select: both copies of params and optimizer state would be live at once.
    params, opt_state = jax.lax.cond(finite, update, lambda *c: c, params, opt_state)
    return params, opt_state, dict(metrics, grad_norm=grad_norm, nonfinite_steps=1.0 - finite)
  return step


def _init_state(tx: optax.GradientTransformation, params: nnx.State, mesh: Mesh | None):
  """(private copy of params, optimizer state, their shardings or None), placed on `mesh`.

  The copy keeps the caller's model usable although the step donates its params.
  """
  if mesh is None:
    params = jax.tree.map(jnp.copy, params)
    return params, jax.jit(tx.init)(params), None
  is_var = lambda x: isinstance(x, nnx.Variable)
  rep = sharding_lib.replicated(mesh)
  param_sh = sharding_lib.param_shardings(params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: rep, is_leaf=is_var)
  params = jax.device_put(params, param_sh, may_alias=False)
  return params, jax.jit(tx.init, out_shardings=opt_sh)(params), (param_sh, opt_sh, rep)


def fit(cfg: TrainerConfig, graphdef: nnx.GraphDef, params: nnx.State, loss_fn: LossFn,
        train: Batch, evaluate: EvalFn | None = None, mesh: Mesh | None = None,
        log_fn: LogFn | None = None, count_fn: CountFn = count_rows,
        checkpoint_dir: str | None = None,
        writer: MetricsWriter | None = None) -> tuple[nnx.State, list[Metrics]]:
  """Minimises `loss_fn` over `cfg.epochs` shuffled passes of `train`.

  Args:
    cfg: Loop settings.
    graphdef, params: `nnx.split` of the model; params are copied, never donated.
    loss_fn: `loss_fn(model, batch) -> (scalar loss, aux metrics)`, pure.
    train: Host arrays [N, ...] sharing their first axis, right padded; every "*attention_mask"
      array counts towards tokens_per_s, and every array as wide as the "*mask" arrays is trimmed
      with them (`batching.trim`).
    evaluate: `evaluate(params) -> metrics`, run every `cfg.eval_every` steps and after the last;
      its metrics join that step's history entry with an "eval_" prefix.
    mesh: Optional mesh; None runs on the default device.
    log_fn: Called as `log_fn(step, entry)` at logging and evaluation steps.
    count_fn: The count `loss_fn` averages over on a batch (rows by default), which weights the
      microbatches of `cfg.micro_batch_size` (see `make_train_step`).
    checkpoint_dir: Where to checkpoint (`resume.LoopCheckpoints`, every `cfg.checkpoint_every`
      steps and on SIGTERM / SIGINT, which then raise `faults.Preempted`); when it holds a
      checkpoint of this config the loop resumes from the newest one. None: no checkpoints.
    writer: The MetricsWriter `log_fn` writes to; a resumed loop drops its records logged after
      the checkpoint.

  Returns:
    (final params, history): one entry per step this call ran, with "step", "epoch",
    "learning_rate", the step metrics, "batch_width" (the width its batch was trimmed to),
    "padding_fraction" (1 - real tokens / slots of its "*attention_mask" arrays),
    "nonfinite_steps_total" (skipped steps so far) and "tokens_per_s" (real tokens over wall
    time of its logging window, compilation and evaluation excluded; async dispatch makes
    single-step timings meaningless). A call resumed after the last step runs none and returns
    the checkpoint's last entry.

  Raises:
    FloatingPointError: `cfg.max_nonfinite_steps` consecutive steps were skipped.
    faults.Preempted: SIGTERM / SIGINT arrived (after the checkpoint of the step it stopped at).
  """
  n = num_rows(train)
  steps_per_epoch = n // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{n} training rows are fewer than batch_size={cfg.batch_size}")
  if cfg.batch_size % _batch_divisor(mesh):
    raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of the mesh's batch axes "
                     f"size {_batch_divisor(mesh)} (mesh {dict(mesh.shape)})")
  total = steps_per_epoch * cfg.epochs
  optim_cfg = (cfg.optim if cfg.optim.total_steps is not None
               else dataclasses.replace(cfg.optim, total_steps=total))
  tx = optim_lib.make_optimizer(optim_cfg)
  schedule = optim_lib.learning_rate_schedule(optim_cfg)
  learning_rates = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
  params, opt_state, shardings = _init_state(tx, params, mesh)
  ckpt = resume.LoopCheckpoints(checkpoint_dir, cfg, writer) if checkpoint_dir else None
  resumed: dict[str, Any] = {}
  if ckpt is not None:
    params, opt_state, resumed = ckpt.restore(params, opt_state)
  jit_kw = {} if shardings is None else {"out_shardings": shardings}
  jitted = jax.jit(make_train_step(loss_fn, graphdef, tx, cfg.micro_batch_size, count_fn),
                   donate_argnums=(0, 1), **jit_kw)
  lengths = batching.row_lengths(train)
  widths = batching.bucket_widths(lengths, cfg.length_buckets, batching.full_width(train))

  start = time.perf_counter()
  step_fns = {}   # one compiled step per width the plan uses, each from its first batch
  for s in batching.plan(lengths, cfg.batch_size, widths, cfg.seed, cfg.epochs,
                         cfg.group_by_length):
    if s.width not in step_fns:
      first = put_batch(batching.trim(take_rows(train, s.rows), s.width), mesh)
      # Traced with the mesh set, so the model's activation constraints apply.
      with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        step_fns[s.width] = jitted.lower(params, opt_state, first).compile()
  logging.info("fit: compiled the train step for widths %s in %.1f s (%d steps)",
               sorted(step_fns), time.perf_counter() - start, total)

  step = resumed.get("step", 0)
  history: list[Metrics] = [resumed["last_entry"]] if step == total else []
  guard = faults.NonfiniteGuard(cfg.max_nonfinite_steps, resumed.get("nonfinite_streak", 0),
                                unit="steps", advice=_NONFINITE_ADVICE)
  skipped = resumed.get("nonfinite_total", 0)
  pending: list[tuple[int, int, dict[str, jax.Array]]] = []
  window_tokens, window_start = 0, time.perf_counter()
  steps = batching.plan(lengths, cfg.batch_size, widths, cfg.seed, cfg.epochs,
                        cfg.group_by_length)   # a pure function of (data, cfg): resume skips
  with faults.PreemptionHandler() as preemption:
    try:
      for epoch, rows, width in itertools.islice(steps, step, None):
        batch = batching.trim(take_rows(train, rows), width)
        params, opt_state, metrics = step_fns[width](params, opt_state, put_batch(batch, mesh))
        step += 1
        real, slots = batching.token_counts(batch)
        pending.append((step, epoch, dict(metrics, batch_width=width,
                                          padding_fraction=1.0 - real / max(slots, 1))))
        window_tokens += real
        eval_now = evaluate is not None and (
            step == total or (cfg.eval_every and step % cfg.eval_every == 0))
        log_now = eval_now or step == total or step % cfg.log_every == 0
        save_now = ckpt is not None and ckpt.due(step)
        if not (log_now or save_now):
          continue
        fetched = jax.device_get([m for _, _, m in pending])   # waits for the window's steps
        rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        for (s, e, _), m in zip(pending, fetched):
          skipped += int(m["nonfinite_steps"])
          history.append({"step": s, "epoch": e, "learning_rate": float(learning_rates[s - 1]),
                          **{k: float(v) for k, v in m.items()},
                          "nonfinite_steps_total": skipped, "tokens_per_s": rate})
          guard.update(s, history[-1])
        if eval_now:
          history[-1].update({f"eval_{k}": v for k, v in evaluate(params).items()})
        if log_now and log_fn is not None:
          log_fn(step, dict(history[-1]))
        pending, window_tokens, window_start = [], 0, time.perf_counter()
        # Polled only here: a multi-process poll is a collective, which would sync every step.
        preempted = preemption.requested()
        if ckpt is not None and (save_now or preempted):
          ckpt.save(step, params, opt_state, force=preempted, nonfinite_streak=guard.streak,
                    nonfinite_total=skipped, last_entry=history[-1])
        if preempted:
          raise faults.Preempted(step, preemption.signum, ckpt.directory if ckpt else None)
    finally:   # a checkpoint in flight completes even when the loop raised
      if ckpt is not None:
        ckpt.close()
  return params, history
