"""The RL loop around `rollout`, `score` and `ppo_update`.

Each iteration: a batch of prompts -> completions -> scores and per-token rewards -> one PPO phase.
Two jitted programs do all the work (collect = rollout + critic + score; update = ppo_update with the
state donated); the host only feeds prompts and reads back metrics. Stops at `max_steps`, once the
evaluated reward-model score reaches `reward_threshold`, or (with `stop_on_hacking`) once the
reward-hacking monitor fires.
"""

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import checkpointing
from rlhf_jax import dynamic_sampling as ds_lib
from rlhf_jax import faults
from rlhf_jax import ppo as ppo_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.collect import collect
from rlhf_jax.data import PromptIterator, encode_prompts
from rlhf_jax.metrics import MetricsWriter, Progress
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.optim import make_optimizer
from rlhf_jax.score import RewardFn, RewardNorm
from rlhf_jax.trainers.ppo_config import PPOTrainerConfig
from rlhf_jax.trainers.ppo_eval import PPOEvaluator


class PPOTrainer:
  """Runs PPO (or a registered variant) from a policy, a reward and prompts.

  Args:
    cfg: PPOTrainerConfig.
    policy: CausalLM to train; the reference is a frozen copy of it unless `ref_policy` is given.
    tokenizer: Hugging Face tokenizer (pad distinct from EOS); its EOS / pad ids fill the
      sampling config's unset ones.
    train_prompts, eval_prompts: Prompt strings; no eval_prompts: evaluations use the first
      `num_eval_prompts` training prompts (a warning says they are not held out).
    reward_fn, reward_params: the reward (see `rlhf_jax.score`).
    value_model: ScalarModel for a critic that needs one (critic="separate").
    gold_fn: Optional text -> score of a judge the policy never sees (logged as gold_score).
    mesh: Device mesh (default: all devices on "data").
    writer: MetricsWriter for per-iteration and eval records.
    checkpoint_dir: Where checkpoints go; when it holds one, training resumes from the newest
      (state, prompt position, reward normalisation) and the writer drops records logged after it.
    use_chat_template: Render the prompts through the tokenizer's chat template (a user turn
      and the generation prompt, `data.encode_prompts`), as the SFT and reward data were.
  """

  def __init__(self, cfg: PPOTrainerConfig, policy, tokenizer, train_prompts: list[str],
               eval_prompts: list[str], *, reward_fn: RewardFn, reward_params: Any,
               value_model=None, ref_policy=None, gold_fn: Callable[[str], float] | None = None,
               mesh=None, writer: MetricsWriter | None = None,
               checkpoint_dir: str | None = None, use_chat_template: bool = False):
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.writer = writer
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    self.algo = dataclasses.replace(cfg.algorithm, sampling=cfg.sampling.with_special_tokens(
        tokenizer.eos_token_id, tokenizer.pad_token_id))
    self.algo.sampling.check_special_tokens()
    self._check_model(policy)
    self._encode_prompts(train_prompts, use_chat_template)
    self._place_models(policy, ref_policy, value_model, reward_params)
    if not eval_prompts:   # evaluation still runs (final metrics, threshold, monitor)
      logging.warning("no evaluation prompts: evaluating on the first %d training prompts, so "
                      "the eval metrics are not held out", cfg.num_eval_prompts)
      eval_prompts = train_prompts
    self.evaluator = PPOEvaluator(
        cfg, self.algo, tokenizer, eval_prompts, policy_graphdef=self.state.policy_graphdef,
        ref_graphdef=self.ref_graphdef, reward_fn=reward_fn, mesh=self.mesh, gold_fn=gold_fn,
        writer=writer, use_chat_template=use_chat_template)
    on_mesh = functools.partial(sharding_lib.on_mesh, self.mesh)
    self._collect = on_mesh(jax.jit(functools.partial(
        collect, self.algo, ref_graphdef=self.ref_graphdef, reward_fn=reward_fn)))
    # `frozen` is an argument, never donated: under LoRA the reference reads the same arrays.
    self._fill = on_mesh(jax.jit(self._fill_impl))
    self._update = on_mesh(jax.jit(ppo_lib.ppo_update, static_argnums=0, donate_argnums=1,
                                   out_shardings=(self.state_shardings, None)))
    self.history: list[dict[str, Any]] = []
    self.checkpointer = None
    self._resumed: dict[str, Any] = {}
    if checkpoint_dir is not None:
      self.checkpointer = checkpointing.Checkpointer(
          checkpoint_dir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
          fingerprint=checkpointing.config_fingerprint(cfg))
      self._resume()

  def _check_model(self, policy) -> None:
    cfg, tokenizer = self.cfg, self.tokenizer
    if policy.cfg.vocab_size < len(tokenizer):
      raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the policy's vocabulary has "
                       f"{policy.cfg.vocab_size}")
    if cfg.max_prompt_len + cfg.sampling.max_new_tokens > policy.cfg.max_position_embeddings:
      raise ValueError(f"max_prompt_len + sampling.max_new_tokens = {cfg.max_prompt_len} + "
                       f"{cfg.sampling.max_new_tokens} exceeds the policy's "
                       f"max_position_embeddings = {policy.cfg.max_position_embeddings}")

  def _encode_prompts(self, train_prompts: list[str], use_chat_template: bool) -> None:
    cfg = self.cfg
    enc = encode_prompts(self.tokenizer, train_prompts, cfg.max_prompt_len, use_chat_template)
    if enc.num_truncated:
      logging.warning("%d of %d train prompts were longer than max_prompt_len=%d and were "
                      "left-truncated", enc.num_truncated, len(train_prompts), cfg.max_prompt_len)
    self.prompts = PromptIterator(enc.ids, enc.mask, cfg.batch_size, cfg.seed,
                                  jax.process_index(), jax.process_count())

  def _place_models(self, policy, ref_policy, value_model, reward_params) -> None:
    """The train state, the frozen bases under LoRA, and the frozen reference and reward
    models, on the mesh."""
    if self.cfg.lora.enabled:
      key = jax.random.fold_in(jax.random.key(self.cfg.seed), -2 & 0x7FFFFFFF)
      policy = lora_lib.add_adapters(policy, self.cfg.lora, jax.random.fold_in(key, 0))
      if value_model is not None and self.algo.critic_impl.needs_value_model:
        value_model = lora_lib.add_adapters(value_model, self.cfg.lora, jax.random.fold_in(key, 1))
    state = ppo_lib.init_train_state(self.algo, policy, make_optimizer(self.cfg.optimizer),
                                     jax.random.key(self.cfg.seed), value_model)
    frozen = ppo_lib.frozen_params(self.algo, policy, value_model)
    self.frozen = {k: None if v is None else sharding_lib.put(
        self._frozen(v, copy=False), sharding_lib.param_shardings(v, self.mesh))
        for k, v in frozen.items()}
    if ref_policy is None and self.frozen["policy"] is not None:
      # LoRA: the reference is the policy's frozen base with the adapters off, not a copy.
      self.ref_graphdef, self.ref_params = lora_lib.base(policy)[0], None
    else:
      ref_policy = ref_policy if ref_policy is not None else policy
      self.ref_graphdef, ref_params = nnx.split(ref_policy)
      # A copy: the state's buffers are donated to every update, the reference's never are.
      self.ref_params = sharding_lib.put(self._frozen(ref_params, copy=True),
                                         sharding_lib.param_shardings(ref_params, self.mesh))
    if isinstance(reward_params, nnx.State):   # a reward model
      reward_params = sharding_lib.put(self._frozen(reward_params, copy=False),
                                       sharding_lib.param_shardings(reward_params, self.mesh))
    elif reward_params is not None:            # a rule's own pytree, left as it is
      reward_params = sharding_lib.put(reward_params, sharding_lib.replicated(self.mesh))
    self.reward_params = reward_params
    self.state_shardings = ppo_lib.train_state_shardings(state, self.mesh)
    self.state = sharding_lib.put(state, self.state_shardings)
    # Replicated like the calibrated and the restored norms, so collect compiles once per run.
    self.reward_norm = self._replicated(RewardNorm.identity())

  def _frozen(self, params, copy: bool):
    """Frozen weights with floating-point leaves in `frozen_param_dtype` when set; a new buffer
    for every leaf that is cast, or for all of them with `copy` (`jnp.array` always copies,
    `asarray` to the same dtype would hand back the donated buffer itself)."""
    def one(x):
      dtype = x.dtype
      if self.cfg.frozen_param_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
        dtype = jnp.dtype(self.cfg.frozen_param_dtype)
      return jnp.array(x, dtype) if copy or dtype != x.dtype else x
    return jax.tree.map(one, params)

  def _run_collect(self, ids, mask, key, reward_norm=None) -> tuple[Any, dict[str, jax.Array]]:
    return self._collect(self.state, ids, mask, key, ref_params=self.ref_params,
                         reward_params=self.reward_params, frozen=self.frozen,
                         reward_norm=self.reward_norm if reward_norm is None else reward_norm)

  # --- host side -------------------------------------------------------------------------------

  def _sample(self, ids, mask, key) -> tuple[Any, dict[str, jax.Array]]:
    """One collect, or with dynamic sampling as many as it takes (`dynamic_sampling.refill`)."""
    if not self.cfg.dynamic_sampling.enabled:
      return self._run_collect(ids, mask, key)

    def sample(i):   # the i-th batch of prompts of this iteration
      batch = (ids, mask) if i == 0 else self._next_batch()[:2]
      return self._run_collect(*batch, jax.random.fold_in(key, i) if i else key)
    return ds_lib.refill(self.cfg.dynamic_sampling, self.cfg.group_size, self.cfg.batch_size,
                         sample, self._fill)

  def _fill_impl(self, batches, keep):
    """`dynamic_sampling.fill_batch`, its rows split over the batch axes like a collect's."""
    out = ds_lib.fill_batch(batches, keep, self.cfg.group_size)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, sharding_lib.batch_sharding(self.mesh, x.ndim)), out)

  def _global_batch(self, local: np.ndarray) -> jax.Array:
    sh = sharding_lib.batch_sharding(self.mesh, local.ndim)
    return jax.make_array_from_process_local_data(sh, local)

  def _replicated(self, tree):
    return sharding_lib.put(tree, sharding_lib.replicated(self.mesh))

  def _next_batch(self):
    ids, mask, epoch = next(self.prompts)
    g = self.cfg.group_size
    if g > 1:   # each prompt's completions sit in consecutive rows: the estimators' group layout
      ids, mask = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
    return self._global_batch(ids), self._global_batch(mask), epoch

  def calibrate_reward(self) -> RewardNorm:
    """Sets gain/bias so the current policy's scores on one batch have mean 0 and std 1."""
    ids, mask, _ = self._next_batch()
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), -1 & 0x7FFFFFFF)
    scored, _ = self._run_collect(ids, mask, key, self._replicated(RewardNorm.identity()))
    self.reward_norm = self._replicated(RewardNorm.calibrate(scored.raw_scores))
    logging.info("reward normalisation: gain %.4f bias %.4f", float(self.reward_norm.gain),
                 float(self.reward_norm.bias))
    return self.reward_norm

  def _resume(self) -> None:
    """Continues from the newest checkpoint, if any; the writer keeps only the records logged up
    to it (all of them being from the checkpointed iterations)."""
    restored = self.checkpointer.restore(self.state)
    if restored is not None:
      self.state, self._resumed = restored
      self.prompts.restore(self._resumed["data_iterator"])
      norm = self._resumed["reward_norm"]
      self.reward_norm = self._replicated(
          RewardNorm(gain=np.float32(norm["gain"]), bias=np.float32(norm["bias"])))
      self.evaluator.history = self._resumed["eval_history"]
      logging.info("resuming PPO from step %d", int(self.state.step))
    if self.writer is not None:
      self.writer.truncate(self._resumed.get("num_records", 0))

  def _checkpoint(self, step: int, force: bool, **host_state) -> None:
    if self.checkpointer is None:
      return
    meta = {
        "data_iterator": self.prompts.state(),
        "reward_norm": {"gain": float(self.reward_norm.gain), "bias": float(self.reward_norm.bias)},
        "num_records": self.writer.num_records if self.writer is not None else 0,
        "eval_history": [{k: v for k, v in e.items() if k != "samples"}
                         for e in self.evaluator.history],
        **host_state,
    }
    self.checkpointer.save(step, self.state, meta, force=force)

  def evaluate(self, step: int) -> dict[str, Any]:
    """The current policy's evaluation record at `step` (`PPOEvaluator`)."""
    return self.evaluator(step, self.state.params, self.frozen, self.ref_params,
                          self.reward_params)

  def train(self) -> dict[str, Any]:
    """Runs until max_steps or the reward threshold; returns the last evaluation."""
    cfg = self.cfg
    resumed = self._resumed
    if cfg.normalize_reward and not resumed:
      self.calibrate_reward()
    with faults.PreemptionHandler() as preemption:
      try:
        step, last_eval, eval_step = self._loop(resumed, preemption)
      finally:   # a checkpoint in flight completes even when the loop raised
        if self.checkpointer is not None:
          self.checkpointer.wait()
    if eval_step != step:
      last_eval = self.evaluate(step)
    return last_eval

  def _loop(self, resumed: dict[str, Any],
            preemption: faults.PreemptionHandler) -> tuple[int, dict[str, Any], int]:
    """The iterations; returns (step, last evaluation, its step)."""
    cfg = self.cfg
    progress = Progress(cfg.max_steps, "ppo", cfg.log_every_s)
    last_eval: dict[str, Any] = resumed.get("last_eval", {})
    eval_step = resumed.get("last_eval_step", -1)
    nonfinite = faults.NonfiniteGuard(cfg.max_nonfinite_iterations,
                                      resumed.get("nonfinite_streak", 0))
    step = int(self.state.step)
    rows = cfg.batch_size * cfg.group_size
    while step < cfg.max_steps:
      t0 = time.time()
      ids, mask, epoch = self._next_batch()
      key = jax.random.fold_in(jax.random.key(cfg.seed), step)
      scored, score_metrics = self._sample(ids, mask, key)
      self.state, update_metrics = self._update(self.algo, self.state, scored, self.frozen)
      # Real tokens only: the prompts' unmasked ones and the completions' (through their EOS).
      metrics, prompt_tokens = jax.device_get(({**score_metrics, **update_metrics},
                                               jnp.sum(mask)))
      step += 1
      dt = time.time() - t0
      real_tokens = float(prompt_tokens) + rows * float(metrics["response_length"])
      metrics.update(epoch=epoch, iteration_s=dt, tokens_per_s=real_tokens / dt)
      if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
        last_eval, eval_step = self.evaluate(step), step
        metrics.update({k: v for k, v in last_eval.items() if k != "samples"})
      record = (self.writer.write(step, metrics) if self.writer is not None
                else {"step": step, **metrics})
      self.history.append(record)
      nonfinite.update(step, record)
      progress.update(step, f"reward {record['raw_score_mean']:.3f} kl {record['kl']:.3f}",
                      force=step == 1)
      reached = bool(cfg.reward_threshold is not None and last_eval
                     and last_eval["eval_reward"] >= cfg.reward_threshold)
      hacked = bool(cfg.stop_on_hacking and eval_step == step and last_eval["reward_hacking"])
      preempted = preemption.requested()
      self._checkpoint(step, force=reached or hacked or preempted or step == cfg.max_steps,
                       last_eval=last_eval, last_eval_step=eval_step,
                       nonfinite_streak=nonfinite.streak)
      if preempted:
        raise faults.Preempted(step, preemption.signum,
                               self.checkpointer.directory if self.checkpointer else None)
      if reached:
        logging.info("eval reward %.4f reached the threshold %.4f at step %d",
                     last_eval["eval_reward"], cfg.reward_threshold, step)
        break
      if hacked:
        logging.warning("stopping at step %d: the reward-hacking monitor fired "
                        "(stop_on_hacking)", step)
        break
    return step, last_eval, eval_step

  @property
  def adapted_policy(self):
    """The current policy as a CausalLM, with its LoRA adapters if it has them (on the host)."""
    params = jax.device_get(lora_lib.join(self.frozen, self.state.params)["policy"])
    return nnx.merge(self.state.policy_graphdef, params)

  @property
  def policy(self):
    """The current policy as a plain CausalLM: LoRA adapters merged into the weights."""
    model = self.adapted_policy
    return lora_lib.merged(model) if lora_lib.adapters(model) else model
