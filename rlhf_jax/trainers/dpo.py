"""Offline preference optimisation (DPO and kin) of a CausalLM on preference pairs.

The alternative to reward model + PPO (Rafailov et al. 2023): the policy is trained directly on
the pairs the reward model would have learned from, with a loss of `rlhf_jax.preference_losses`
picked by name. Rows are `data.encode_preferences`' (the reward trainer's formats, HH included);
a side's log-prob is the sum over its completion tokens, EOS included, computed from hidden
states through the LM head in chunks (`logprobs.chunked_token_logprobs`).

The reference's log-probs are computed once, before training, in one pass over the data, and
stored beside the batch ("ref_*_logps" [N]); no reference weights exist during the training
steps. The reference is the policy as given unless `ref_policy` is passed: the seam for a LoRA
policy, whose reference is the base with its adapters off.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import data
from rlhf_jax import evaluation
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.logprobs import chunked_token_logprobs
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import CausalLM
from rlhf_jax.preference_losses import (PreferenceInputs, PreferenceLossConfig, preference_loss,
                                        sequence_logps)
from rlhf_jax.rollout import SamplingConfig, rollout
from rlhf_jax.score import completion_logprobs
from rlhf_jax.trainers import supervised as trainers


@dataclasses.dataclass(frozen=True)
class DPOConfig(trainers.TrainerConfig):
  """Offline preference settings: the fields of `trainers.TrainerConfig` (a batch is
  `batch_size` pairs, 2 * batch_size sequences in one forward, 3 * for kto) and

  Attributes:
    loss: Which preference loss and its coefficients (beta, label smoothing, ...).
    max_prompt_len: Token width of the evaluation prompts the policy completes.
    num_eval_prompts: Prompts completed by the policy and the reference at every evaluation
      (KL to the reference, gold score, samples); 0: pair metrics only.
    sampling: How evaluation completions are sampled (the default config sets PPO's, so the
      two methods' figures compare).
    num_samples_logged: Rows of the samples table.
  """
  loss: PreferenceLossConfig = PreferenceLossConfig()
  max_prompt_len: int = 64
  num_eval_prompts: int = 128
  sampling: SamplingConfig = SamplingConfig()
  num_samples_logged: int = 8

  def __post_init__(self):
    super().__post_init__()
    if self.max_prompt_len < 1:
      raise ValueError(f"max_prompt_len must be >= 1, got {self.max_prompt_len}")
    if self.num_eval_prompts < 0 or self.num_samples_logged < 0:
      raise ValueError("num_eval_prompts and num_samples_logged must be >= 0")


def _sides(loss_cfg: PreferenceLossConfig) -> tuple[str, ...]:
  return ("chosen", "rejected", "kl") if loss_cfg.needs_kl_rows else ("chosen", "rejected")


def encode_pairs(tokenizer: Any, pairs: Sequence[data.PreferencePair], cfg: DPOConfig,
                 use_chat_template: bool = False) -> trainers.Batch:
  """int32 [N, max_len] "{side}_ids", "{side}_attention_mask" and "{side}_completion_mask" for
  side in chosen, rejected (row m of both is the same pair), and for kto "kl": pair m's prompt
  followed by pair m-1's chosen completion (TRL's mismatched KL rows, fixed at encoding).
  `use_chat_template`: every row through the tokenizer's chat template
  (`data.encode_preferences`)."""
  enc = data.encode_preferences(tokenizer, pairs, cfg.max_len, drop_overlong=cfg.drop_overlong,
                                use_chat_template=use_chat_template)
  out = {f"{side}_{k}": getattr(enc, f"{side}_{k}") for side in ("chosen", "rejected")
         for k in ("ids", "attention_mask", "completion_mask")}
  if cfg.loss.needs_kl_rows:
    kept = [pairs[i] for i in enc.kept]
    kl = data.encode_prompt_completion(
        tokenizer, [p.prompt for p in kept], [p.chosen for p in kept[-1:] + kept[:-1]], cfg.max_len,
        use_chat_template=use_chat_template)
    out.update(kl_ids=kl.ids, kl_attention_mask=kl.attention_mask,
               kl_completion_mask=kl.completion_mask)
  return out


def side_logps(model: CausalLM, batch: Mapping[str, jax.Array],
               sides: Sequence[str]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{side: (sum of completion-token log-probs [B], completion tokens [B])} from ONE forward
  over the stacked rows of `sides`; position t's hidden state predicts token t + 1."""
  b = batch[f"{sides[0]}_ids"].shape[0]
  stack = lambda key: jnp.concatenate([batch[f"{s}_{key}"] for s in sides])
  ids, completion = stack("ids"), stack("completion_mask")
  hidden, _ = model.decoder(ids, attention_mask=stack("attention_mask"))
  logp = chunked_token_logprobs(hidden[:, :-1], model.logits, ids[:, 1:],
                                chunk_size=model.cfg.logits_chunk_size)
  total, count = sequence_logps(logp, completion[:, 1:])
  return {s: (total[i * b:(i + 1) * b], count[i * b:(i + 1) * b]) for i, s in enumerate(sides)}


def preference_inputs(model: CausalLM, batch: Mapping[str, jax.Array],
                      loss_cfg: PreferenceLossConfig) -> PreferenceInputs:
  """The loss's inputs: the policy's log-probs from `side_logps`, the reference's from the
  batch's stored "ref_*_logps" (zeros for reference-free losses, which never read them)."""
  lp = side_logps(model, batch, _sides(loss_cfg))
  ref = lambda side: (batch[f"ref_{side}_logps"] if loss_cfg.needs_reference
                      else jnp.zeros_like(lp[side][0]))
  kl = loss_cfg.needs_kl_rows
  return PreferenceInputs(
      lp["chosen"][0], lp["rejected"][0], ref("chosen"), ref("rejected"), lp["chosen"][1],
      lp["rejected"][1], lp["kl"][0] if kl else None, ref("kl") if kl else None)


def dpo_batch_loss(model: CausalLM, batch: Mapping[str, jax.Array],
                   loss_cfg: PreferenceLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`preference_losses.preference_loss` of `model` on a batch of `encode_pairs` rows with
  their reference log-probs."""
  return preference_loss(loss_cfg, preference_inputs(model, batch, loss_cfg))


def reference_logps(graphdef: nnx.GraphDef, params: nnx.State, arrays: trainers.Batch,
                    sides: Sequence[str], batch_size: int, mesh: Mesh | None) -> trainers.Batch:
  """{"ref_{side}_logps": float32 [N]}: the frozen model's completion log-probs of every row,
  one jitted pass in batches of `batch_size`."""
  fn = jax.jit(lambda p, b: {s: v[0] for s, v in side_logps(nnx.merge(graphdef, p), b,
                                                            sides).items()})
  outputs = trainers.map_batches(fn, params, {k: v for k, v in arrays.items()
                                              if k.split("_")[0] in sides}, batch_size, mesh)
  n = trainers.num_rows(arrays)
  return {f"ref_{s}_logps": np.concatenate([o[s] for o in outputs])[:n].astype(np.float32)
          for s in sides}


def make_pair_evaluator(graphdef: nnx.GraphDef, arrays: trainers.Batch,
                        loss_cfg: PreferenceLossConfig, batch_size: int,
                        mesh: Mesh | None) -> trainers.EvalFn:
  """`evaluate(params) -> {"loss", "chosen_reward", ..., "num_pairs"}`: the loss and its aux
  over all held-out pairs at once (kto's reference point over all of them too)."""
  inputs = jax.jit(lambda p, b: preference_inputs(nnx.merge(graphdef, p), b, loss_cfg))
  n = trainers.num_rows(arrays)

  def evaluate(params: nnx.State) -> trainers.Metrics:
    outs = trainers.map_batches(inputs, params, arrays, batch_size, mesh)
    joined = PreferenceInputs(*(None if parts[0] is None else
                                jnp.asarray(np.concatenate(parts)[:n]) for parts in zip(*outs)))
    loss, aux = preference_loss(loss_cfg, joined)
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}, "num_pairs": float(n)}
  return evaluate


def prompt_arrays(tokenizer: Any, prompts: Sequence[str], held_out: trainers.Batch,
                  cfg: DPOConfig, use_chat_template: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded int32 [M, max_prompt_len] (ids, mask) of the first `cfg.num_eval_prompts`
  prompts: `prompts` encoded (`use_chat_template` as the pairs were), or without them the
  distinct prompts of the held-out pairs, taken from their token rows (no decode/encode round
  trip), left-truncated like `encode_prompts`."""
  if prompts:
    enc = data.encode_prompts(tokenizer, list(prompts)[:cfg.num_eval_prompts], cfg.max_prompt_len,
                              use_chat_template=use_chat_template)
    return enc.ids, enc.mask
  rows = evaluation.valid_rows(held_out["chosen_ids"], held_out["chosen_attention_mask"]
                               - held_out["chosen_completion_mask"])
  rows = list(dict.fromkeys(tuple(r[-cfg.max_prompt_len:]) for r in rows))[:cfg.num_eval_prompts]
  ids = np.full((len(rows), cfg.max_prompt_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros(ids.shape, np.int32)
  for i, r in enumerate(rows):
    if r:
      ids[i, -len(r):], mask[i, -len(r):] = r, 1
  return ids, mask


def make_generation_evaluator(graphdef: nnx.GraphDef, ref_params: nnx.State, tokenizer: Any,
                              prompt_ids: np.ndarray, prompt_mask: np.ndarray, cfg: DPOConfig,
                              gold_fn: Callable[[str], float] | None,
                              mesh: Mesh | None) -> Callable[[nnx.State], dict[str, Any]]:
  """`evaluate(params) -> metrics`: the policy and the reference complete the same left-padded
  prompts (`cfg.sampling`, one fixed key from `cfg.seed`), reported by `evaluation.eval_metrics`
  as PPO's evaluation is.

  There is no reward model: "eval_reward" is the implicit reward beta * (log pi(y|x) -
  log pi_ref(y|x)) of each side's completions, "eval_kl" the mean over completions of
  sum_t (log pi - log pi_ref) on the policy's samples (the k1 estimate of KL(pi || pi_ref)),
  "gold_score" the judge's when `gold_fn` is given. "samples" holds `cfg.num_samples_logged`
  rows, their reward column the gold score (the implicit reward without a judge).
  """
  sampling = cfg.sampling.with_special_tokens(tokenizer.eos_token_id, tokenizer.pad_token_id)
  beta = cfg.loss.beta
  # Buffers of their own: placed on a mesh, the policy's params could share a shard with the
  # copy `fit` makes of them, which its steps donate.
  ref_params = jax.tree.map(jnp.copy, ref_params)
  if mesh is not None:
    ref_params = jax.device_put(ref_params, sharding_lib.param_shardings(ref_params, mesh))

  def seq_logps(params, ro):
    return jnp.sum(completion_logprobs(nnx.merge(graphdef, params), ro), axis=-1)

  @jax.jit
  def programme(params, ref_params, ids, mask, key):
    ro = rollout(graphdef, params, ids, mask, key, sampling)
    ref_ro = rollout(graphdef, ref_params, ids, mask, key, sampling)
    log_ratio = seq_logps(params, ro) - seq_logps(ref_params, ro)
    ref_log_ratio = seq_logps(params, ref_ro) - seq_logps(ref_params, ref_ro)
    metrics = {"kl": log_ratio.mean(), "response_length": ro.completion_mask.sum(-1).mean(),
               "eos_rate": ro.finished.astype(jnp.float32).mean()}
    return ro, ref_ro, beta * log_ratio, beta * ref_log_ratio, metrics

  batch = trainers.put_batch({"ids": prompt_ids, "mask": prompt_mask}, mesh)
  key = jax.random.key(cfg.seed)

  def evaluate(params: nnx.State) -> dict[str, Any]:
    if mesh is None:
      out = programme(params, ref_params, batch["ids"], batch["mask"], key)
    else:
      with jax.set_mesh(mesh):
        out = programme(params, ref_params, batch["ids"], batch["mask"], key)
    ro, ref_ro, raw, ref_raw, m = jax.device_get(out)
    texts = evaluation.completion_texts(tokenizer, ro.completion_ids, ro.completion_mask)
    gold = ref_gold = None
    if gold_fn is not None:
      gold = evaluation.gold_scores(gold_fn, texts)
      ref_gold = evaluation.gold_scores(gold_fn, evaluation.completion_texts(
          tokenizer, ref_ro.completion_ids, ref_ro.completion_mask))
    metrics: dict[str, Any] = evaluation.eval_metrics(
        raw, ref_raw, m, evaluation.valid_rows(ro.completion_ids, ro.completion_mask),
        evaluation.valid_rows(ref_ro.completion_ids, ref_ro.completion_mask), gold, ref_gold)
    shown = tokenizer.batch_decode(evaluation.valid_rows(ro.prompt_ids, ro.prompt_mask))
    metrics["samples"] = evaluation.sample_rows(shown, texts, raw if gold is None else gold,
                                                cfg.num_samples_logged)
    return metrics
  return evaluate


def train_dpo(policy: CausalLM, tokenizer: Any, pairs: Sequence[data.PreferencePair],
              cfg: DPOConfig, mesh: Mesh | None = None, log_fn: trainers.LogFn | None = None,
              eval_pairs: Sequence[data.PreferencePair] | None = None,
              eval_prompts: Sequence[str] = (), gold_fn: Callable[[str], float] | None = None,
              ref_policy: CausalLM | None = None, checkpoint_dir: str | None = None,
              writer: MetricsWriter | None = None, use_chat_template: bool = False,
              ) -> tuple[CausalLM, list[trainers.Metrics], dict[str, Any]]:
  """Optimises `policy` on preference pairs with the loss `cfg.loss.name`.

  Args:
    policy: The CausalLM to train (usually the SFT policy); left unchanged (params copied).
    tokenizer: A transformers tokenizer with distinct pad and EOS tokens.
    pairs: Preference pairs; `cfg.eval_fraction` are held out unless `eval_pairs` is given.
    cfg: DPOConfig.
    mesh: Optional mesh (params by their logical axes, pairs over the batch axes).
    log_fn: `log_fn(step, metrics)` at logging and evaluation steps.
    eval_pairs: Explicit held-out pairs (then nothing is split off `pairs`).
    eval_prompts: Prompts of the generation evaluation; empty: the held-out pairs' prompts.
    gold_fn: Optional text -> score of a judge the policy never sees (logged as gold_score).
    ref_policy: The frozen reference (same graph as `policy`); None: `policy` as given.
    checkpoint_dir, writer: Checkpoints and resumption (see `trainers.fit`); the reference
      log-probs are recomputed on resume, deterministically.
    use_chat_template: Render the pairs and `eval_prompts` through the tokenizer's chat
      template, as the SFT demonstrations were.

  Returns:
    (trained policy, history, final evaluation). History: per-step "loss" and the loss's aux
    (chosen/rejected rewards and log-probs, reward_accuracy, reward_margin), "grad_norm",
    "learning_rate", "tokens_per_s"; evaluation steps add the held-out pairs' loss and aux and
    the generation metrics (`make_generation_evaluator`: kl, reward, win_rate, gold_score, ...),
    each prefixed "eval_". Final evaluation: the last evaluation's metrics without the prefix,
    with its "samples" ({} without held-out pairs or prompts).
  """
  train, held_out = trainers.train_eval_arrays(
      lambda items: encode_pairs(tokenizer, items, cfg, use_chat_template), pairs, eval_pairs, cfg,
      policy.cfg.vocab_size)
  graphdef, params = nnx.split(policy)
  ref_params = params if ref_policy is None else nnx.state(ref_policy)
  sides = _sides(cfg.loss)
  has_held_out = trainers.num_rows(held_out) > 0
  if cfg.loss.needs_reference:
    train = {**train, **reference_logps(graphdef, ref_params, train, sides, cfg.batch_size, mesh)}
    if has_held_out:
      held_out = {**held_out, **reference_logps(graphdef, ref_params, held_out, sides,
                                                cfg.batch_size, mesh)}
  pair_eval = (make_pair_evaluator(graphdef, held_out, cfg.loss, cfg.batch_size, mesh)
               if has_held_out else None)
  generation = None
  if cfg.num_eval_prompts and (eval_prompts or has_held_out):
    ids, mask = prompt_arrays(tokenizer, eval_prompts, held_out, cfg, use_chat_template)
    generation = make_generation_evaluator(graphdef, ref_params, tokenizer, ids, mask, cfg,
                                           gold_fn, mesh)
  samples: list[dict[str, Any]] = []

  def evaluate(p: nnx.State) -> trainers.Metrics:
    out = pair_eval(p) if pair_eval is not None else {}
    if generation is not None:
      gen = generation(p)
      samples[:] = gen.pop("samples")
      # fit adds "eval_" to every name; eval_metrics' own names have it already.
      out.update({k.removeprefix("eval_"): v for k, v in gen.items()})
    return out

  params, history = trainers.fit(
      cfg, graphdef, params, functools.partial(dpo_batch_loss, loss_cfg=cfg.loss), train,
      evaluate if pair_eval is not None or generation is not None else None, mesh, log_fn,
      checkpoint_dir=checkpoint_dir, writer=writer)
  final: dict[str, Any] = {k.removeprefix("eval_"): v for k, v in history[-1].items()
                           if k.startswith("eval_")}
  if samples:
    final["samples"] = samples
  return nnx.merge(graphdef, params), history, final
