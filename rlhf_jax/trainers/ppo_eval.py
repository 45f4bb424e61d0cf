"""The PPO loop's evaluations on held-out prompts.

One jitted program samples the policy and the reference on the same prompts with the same key and
scores both; the host decodes what it reads back into the eval record (`rlhf_jax.evaluation`):
reward, KL, length, distinct-n, win rate against the reference, gold score, samples, and the
reward-hacking monitor's verdict over the run's evaluations so far.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging

from rlhf_jax import evaluation
from rlhf_jax import ppo as ppo_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import encode_prompts
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.rollout import rollout
from rlhf_jax.score import RewardFn, reward_terms, score


class PPOEvaluator:
  """Evaluates the PPO trainer's policy on `prompts`; `history` holds every evaluation's record
  (the monitor reads it, the trainer checkpoints it).

  Args:
    cfg: The trainer's PPOTrainerConfig: the first `num_eval_prompts` of `prompts` are evaluated,
      left-padded / left-truncated to `max_prompt_len` tokens; evaluation at step k samples with
      fold_in(key(seed + 1), k); `num_samples_logged` rows go to the sample table.
    algo: The run's PPOConfig (sampling with the tokenizer's special tokens filled in).
    tokenizer: Hugging Face tokenizer of the run.
    prompts: Evaluation prompt strings.
    policy_graphdef, ref_graphdef: Structure of the trained policy and of the reference.
    reward_fn: The run's reward (see `rlhf_jax.score`).
    mesh: Device mesh of the run.
    gold_fn: Optional text -> score of a judge the policy never sees (logged as gold_score).
    writer: MetricsWriter the sample table goes to.
    use_chat_template: Render the prompts through the tokenizer's chat template, as the
      trainer's training prompts are.
  """

  def __init__(self, cfg, algo: ppo_lib.PPOConfig, tokenizer, prompts: list[str], *,
               policy_graphdef, ref_graphdef, reward_fn: RewardFn, mesh,
               gold_fn: Callable[[str], float] | None = None, writer: MetricsWriter | None = None,
               use_chat_template: bool = False):
    self.cfg, self.algo, self.tokenizer = cfg, algo, tokenizer
    self.gold_fn, self.writer = gold_fn, writer
    self.policy_graphdef, self.ref_graphdef = policy_graphdef, ref_graphdef
    self.reward_fn = reward_fn
    enc = encode_prompts(tokenizer, prompts[:cfg.num_eval_prompts], cfg.max_prompt_len,
                         use_chat_template)
    self.ids, self.mask = enc.ids, enc.mask
    # Replicated outputs: every process decodes all evaluation rows on the host.
    self._rollouts = sharding_lib.on_mesh(mesh, jax.jit(
        self._rollouts_impl, out_shardings=sharding_lib.replicated(mesh)))
    self.history: list[dict[str, Any]] = []

  def _rollouts_impl(self, params, frozen, ref_params, reward_params, ids, mask, key):
    sampling = self.algo.sampling
    policy_params = lora_lib.join(frozen, params)["policy"]
    ref_params = frozen["policy"] if ref_params is None else ref_params
    ro = rollout(self.policy_graphdef, policy_params, ids, mask, key, sampling)
    ref_ro = rollout(self.ref_graphdef, ref_params, ids, mask, key, sampling)
    scored, metrics = score(self.algo, ro, ref_graphdef=self.ref_graphdef,
                            ref_params=ref_params, reward_fn=self.reward_fn,
                            reward_params=reward_params, kl_coef=jnp.zeros(()))
    ref_raw, _ = reward_terms(self.reward_fn, reward_params, ref_ro)
    return ro, ref_ro, scored.raw_scores, ref_raw, metrics

  def __call__(self, step: int, params, frozen, ref_params, reward_params) -> dict[str, Any]:
    """The record of an evaluation at `step` of the policy (trained `params`, `frozen` bases
    under LoRA) against the reference (`ref_params`, None under LoRA)."""
    key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
    ro, ref_ro, raw, ref_raw, m = jax.device_get(self._rollouts(
        params, frozen, ref_params, reward_params, self.ids, self.mask, key))
    texts = evaluation.completion_texts(self.tokenizer, ro.completion_ids, ro.completion_mask)
    gold = ref_gold = None
    if self.gold_fn is not None:
      gold = evaluation.gold_scores(self.gold_fn, texts)
      ref_gold = evaluation.gold_scores(self.gold_fn, evaluation.completion_texts(
          self.tokenizer, ref_ro.completion_ids, ref_ro.completion_mask))
    out: dict[str, Any] = evaluation.eval_metrics(
        raw, ref_raw, m, evaluation.valid_rows(ro.completion_ids, ro.completion_mask),
        evaluation.valid_rows(ref_ro.completion_ids, ref_ro.completion_mask), gold, ref_gold)
    prompts = self.tokenizer.batch_decode(evaluation.valid_rows(ro.prompt_ids, ro.prompt_mask))
    out["samples"] = evaluation.sample_rows(prompts, texts, raw, self.cfg.num_samples_logged)
    self.history.append(out)
    verdict = evaluation.reward_hacking(self.history)
    out.update(verdict.signals, reward_hacking=int(verdict.flag))
    if verdict.flag:
      logging.warning("possible reward hacking at step %d: %s", step, verdict.reason)
    else:
      logging.info("reward-hacking monitor at step %d: quiet; %s", step, verdict.reason)
    if self.writer is not None:
      self.writer.write_text(step, "eval_samples", evaluation.samples_table(out["samples"]))
    return out
