"""Reward-model training on preference pairs with the Bradley-Terry loss.

The second stage of the RLHF recipe (Christiano et al. 2017; Ziegler et al. 2019; Ouyang et al.
2022): a ScalarModel scores prompt + completion at its last real token, the EOS appended by
`data.encode_preferences` (where the PPO scorer reads it too), and learns
P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)).
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import data
from rlhf_jax import losses
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.trainers import supervised as trainers
from rlhf_jax.models import ScalarModel


@dataclasses.dataclass(frozen=True)
class RewardConfig(trainers.TrainerConfig):
  """Reward-model settings: the fields of `trainers.TrainerConfig` (a batch is `batch_size`
  pairs, 2 * batch_size sequences in one forward) and

  Attributes:
    center_coef: Weight of the reward-centering penalty mean((r_c + r_r)^2) (Eisenstein et al.
      2023), which keeps scores near 0 without changing their differences; 0: off.
  """
  center_coef: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if not self.center_coef >= 0:   # NaN too
      raise ValueError(f"center_coef must be >= 0, got {self.center_coef}")


def encode_pairs(tokenizer: Any, pairs: Sequence[data.PreferencePair], cfg: RewardConfig,
                 use_chat_template: bool = False) -> trainers.Batch:
  """int32 [N, max_len] "chosen_ids", "chosen_attention_mask", "rejected_ids" and
  "rejected_attention_mask"; row m of both sides is the same pair, each ending in EOS (with
  `use_chat_template`: the template's turns, `data.encode_preferences`)."""
  enc = data.encode_preferences(tokenizer, pairs, cfg.max_len, drop_overlong=cfg.drop_overlong,
                                use_chat_template=use_chat_template)
  return {"chosen_ids": enc.chosen_ids, "chosen_attention_mask": enc.chosen_attention_mask,
          "rejected_ids": enc.rejected_ids, "rejected_attention_mask": enc.rejected_attention_mask}


def pair_scores(model: ScalarModel,
                batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(r_chosen [B], r_rejected [B]) from ONE forward over the 2B rows, read at each row's last
  real token (the EOS of right-padded rows)."""
  b = batch["chosen_ids"].shape[0]
  ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
  mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
  scores = model(ids, attention_mask=mask)
  return scores[:b], scores[b:]


def reward_batch_loss(model: ScalarModel, batch: Mapping[str, jax.Array],
                      center_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`losses.bradley_terry_loss` of `model`'s scores on a batch of `encode_pairs` rows."""
  return losses.bradley_terry_loss(*pair_scores(model, batch), center_coef=center_coef)


def make_evaluator(graphdef: nnx.GraphDef, arrays: trainers.Batch, batch_size: int,
                   mesh: Mesh | None, length_buckets: int = 1) -> trainers.EvalFn:
  """`evaluate(params) -> {"loss", "accuracy", "margin_mean", "num_pairs"}`: the Bradley-Terry
  loss (no centering) and its statistics over all pairs of `arrays` at once; batches trimmed to
  at most `length_buckets` widths (`trainers.map_batches`)."""
  scores = jax.jit(lambda params, batch: pair_scores(nnx.merge(graphdef, params), batch))
  n = trainers.num_rows(arrays)

  def evaluate(params: nnx.State) -> trainers.Metrics:
    outputs = trainers.map_batches(scores, params, arrays, batch_size, mesh, length_buckets)
    r_chosen = np.concatenate([c for c, _ in outputs])[:n]   # drop the padding rows
    r_rejected = np.concatenate([r for _, r in outputs])[:n]
    loss, aux = losses.bradley_terry_loss(jnp.asarray(r_chosen), jnp.asarray(r_rejected))
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}, "num_pairs": float(n)}
  return evaluate


def train_reward_model(model: ScalarModel, tokenizer: Any, pairs: Sequence[data.PreferencePair],
                       cfg: RewardConfig, mesh: Mesh | None = None,
                       log_fn: trainers.LogFn | None = None,
                       eval_pairs: Sequence[data.PreferencePair] | None = None,
                       checkpoint_dir: str | None = None, writer: MetricsWriter | None = None,
                       use_chat_template: bool = False,
                       ) -> tuple[ScalarModel, list[trainers.Metrics], trainers.Metrics]:
  """Trains `model` to score chosen above rejected completions.

  Args:
    model: A ScalarModel with one label; left unchanged (its params are copied).
    tokenizer: A transformers tokenizer with distinct pad and EOS tokens.
    pairs: Preference pairs; `cfg.eval_fraction` of them are held out unless `eval_pairs` is
      given.
    cfg: RewardConfig.
    mesh: Optional mesh (params by their logical axes, pairs over the batch axes).
    log_fn: `log_fn(step, metrics)` at logging and evaluation steps.
    eval_pairs: Explicit held-out pairs (then nothing is split off `pairs`).
    checkpoint_dir, writer: Checkpoints and resumption (see `trainers.fit`).
    use_chat_template: Render the pairs through the tokenizer's chat template, as the PPO
      prompts are, so PPO's rollouts are scored in the format the model learned.

  Returns:
    (trained model, history, eval_metrics). History: per-step "loss", "accuracy", "margin_mean",
    "grad_norm", "learning_rate", "tokens_per_s"; evaluation steps add "eval_loss",
    "eval_accuracy", "eval_margin_mean". eval_metrics: the final held-out "loss", "accuracy",
    "margin_mean", "num_pairs" ({} without a held-out set).
  """
  if model.cfg.num_labels != 1:
    raise ValueError(f"a reward model needs num_labels=1, got {model.cfg.num_labels}")
  train, held_out = trainers.train_eval_arrays(
      lambda items: encode_pairs(tokenizer, items, cfg, use_chat_template), pairs, eval_pairs, cfg,
      model.cfg.vocab_size)
  graphdef, params = nnx.split(model)
  evaluate = (make_evaluator(graphdef, held_out, cfg.batch_size, mesh, cfg.length_buckets)
              if trainers.num_rows(held_out) else None)
  loss_fn = functools.partial(reward_batch_loss, center_coef=cfg.center_coef)
  params, history = trainers.fit(cfg, graphdef, params, loss_fn, train, evaluate, mesh, log_fn,
                                 checkpoint_dir=checkpoint_dir, writer=writer)
  # fit evaluates after the last step; its entry holds the final held-out metrics.
  eval_metrics = {k[len("eval_"):]: v for k, v in history[-1].items() if k.startswith("eval_")}
  return nnx.merge(graphdef, params), history, eval_metrics
