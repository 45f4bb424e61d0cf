"""Supervised fine-tuning of a CausalLM on (prompt, completion) demonstrations.

The first stage of the RLHF recipe (Ziegler et al. 2019; Ouyang et al. 2022): maximum likelihood
of the demonstrated completion given its prompt. Rows are `[prompt | completion | EOS | pad]`
(`data.encode_prompt_completion`) and only completion tokens, EOS included, are targets
(`losses.sft_loss`), so the model learns to end its replies.
"""

import dataclasses
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
from rlhf_jax.models import CausalLM


@dataclasses.dataclass(frozen=True)
class SFTConfig(trainers.TrainerConfig):
  """Supervised fine-tuning settings; the fields are those of `trainers.TrainerConfig`.

  A batch is `batch_size` demonstrations; its loss is the mean over all their completion tokens.
  """


def encode_examples(tokenizer: Any, examples: Sequence[data.SFTExample], cfg: SFTConfig,
                    use_chat_template: bool = False) -> trainers.Batch:
  """int32 [N, max_len] "ids", "attention_mask" and "completion_mask" of right-padded rows
  (with `use_chat_template`: the template's user and assistant turns,
  `data.encode_prompt_completion`)."""
  enc = data.encode_prompt_completion(
      tokenizer, [e.prompt for e in examples], [e.completion for e in examples], cfg.max_len,
      drop_overlong=cfg.drop_overlong, use_chat_template=use_chat_template)
  return {"ids": enc.ids, "attention_mask": enc.attention_mask,
          "completion_mask": enc.completion_mask}


def sft_batch_loss(model: CausalLM,
                   batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`losses.sft_loss` of `model` on a batch of `encode_examples` rows."""
  logits, _ = model(batch["ids"], attention_mask=batch["attention_mask"])
  return losses.sft_loss(logits, batch["ids"], batch["completion_mask"])


def sft_batch_targets(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The count `sft_batch_loss` averages over: completion tokens after a row's first position
  (the targets of `losses.sft_loss`), float32."""
  return jnp.sum(batch["completion_mask"][:, 1:] != 0, dtype=jnp.float32)


def make_evaluator(graphdef: nnx.GraphDef, arrays: trainers.Batch, batch_size: int,
                   mesh: Mesh | None, length_buckets: int = 1) -> trainers.EvalFn:
  """`evaluate(params) -> {"loss", "token_accuracy", "num_tokens"}` over all of `arrays`, each
  a mean over every completion token of the set (not a mean of batch means); batches trimmed to
  at most `length_buckets` widths (`trainers.map_batches`)."""
  @jax.jit
  def sums(params, batch):
    loss, aux = sft_batch_loss(nnx.merge(graphdef, params), batch)
    n = aux["num_tokens"]
    return loss * n, aux["token_accuracy"] * n, n

  def evaluate(params: nnx.State) -> trainers.Metrics:
    nll, correct, n = np.sum(trainers.map_batches(sums, params, arrays, batch_size, mesh,
                                                  length_buckets), axis=0)
    n = max(float(n), 1.0)
    return {"loss": float(nll) / n, "token_accuracy": float(correct) / n, "num_tokens": n}
  return evaluate


def train_sft(model: CausalLM, tokenizer: Any, examples: Sequence[data.SFTExample],
              cfg: SFTConfig, mesh: Mesh | None = None, log_fn: trainers.LogFn | None = None,
              eval_examples: Sequence[data.SFTExample] | None = None,
              checkpoint_dir: str | None = None, writer: MetricsWriter | None = None,
              use_chat_template: bool = False) -> tuple[CausalLM, list[trainers.Metrics]]:
  """Fine-tunes `model` on `examples` with the completion-only next-token loss.

  Args:
    model: The policy to fine-tune; left unchanged (its params are copied).
    tokenizer: A transformers tokenizer with distinct pad and EOS tokens.
    examples: Demonstrations; `cfg.eval_fraction` of them are held out unless `eval_examples`
      is given.
    cfg: SFTConfig.
    mesh: Optional mesh (params by their logical axes, rows over the batch axes).
    log_fn: `log_fn(step, metrics)` at logging and evaluation steps.
    eval_examples: Explicit held-out demonstrations (then nothing is split off `examples`).
    checkpoint_dir, writer: Checkpoints and resumption (see `trainers.fit`).
    use_chat_template: Render the demonstrations through the tokenizer's chat template, as
      the PPO prompts are (`data.encode_prompt_completion`).

  Returns:
    (trained model, history): per-step "loss", "token_accuracy", "num_tokens", "grad_norm",
    "learning_rate", "tokens_per_s"; evaluation steps add "eval_loss" and "eval_token_accuracy".
  """
  train, held_out = trainers.train_eval_arrays(
      lambda items: encode_examples(tokenizer, items, cfg, use_chat_template), examples,
      eval_examples, cfg, model.cfg.vocab_size)
  graphdef, params = nnx.split(model)
  evaluate = (make_evaluator(graphdef, held_out, cfg.batch_size, mesh, cfg.length_buckets)
              if trainers.num_rows(held_out) else None)
  params, history = trainers.fit(cfg, graphdef, params, sft_batch_loss, train, evaluate, mesh,
                                 log_fn, count_fn=sft_batch_targets,
                                 checkpoint_dir=checkpoint_dir, writer=writer)
  return nnx.merge(graphdef, params), history
