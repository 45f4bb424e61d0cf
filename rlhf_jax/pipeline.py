"""The three stages of RLHF driven by one typed config tree: SFT, reward model, PPO (or the two of
the offline route, `method="dpo"`: SFT, then DPO on the preference pairs).

`ExperimentConfig` (`rlhf_jax.experiment`) holds every stage's dataclass (`sft`, `reward`, `ppo`,
`dpo`, `model`), and the command line edits its mirror ConfigDict (`--config.ppo.kl.init_coef=0.2`,
see `rlhf_jax.config_tree`).
The `experiments/*.py` mains are thin wrappers around these functions. Each stage reads its inputs
from paths in the config (or what the previous stage wrote into the workdir) and writes Hugging Face
checkpoints, so stages can run alone, in order, or on users' own checkpoints and data.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import data as data_lib
from rlhf_jax import checkpointing, evaluation, fileio, models, preflight, sharding
from rlhf_jax import rewards as rewards_lib
from rlhf_jax import stages as stages_lib
from rlhf_jax import tasks
from rlhf_jax.experiment import ExperimentConfig, Paths, TaskConfig  # noqa: F401  (the API)
from rlhf_jax.metrics import MetricsWriter, plot_curves, read_jsonl
from rlhf_jax.models import lora
from rlhf_jax.trainers.dpo import train_dpo
from rlhf_jax.trainers.ppo import PPOTrainer
from rlhf_jax.trainers import resume
from rlhf_jax.trainers.reward import train_reward_model
from rlhf_jax.trainers.sft import train_sft

# The reward-model score and the gold score share a panel: their divergence is reward hacking.
PPO_PLOT_KEYS = ["raw_score_mean", ("eval_reward", "gold_score"), "kl", "entropy", "approx_kl",
                 "clipfrac", "value_loss", "explained_variance", "eval_win_rate",
                 "response_length", "tokens_per_s"]
DPO_PLOT_KEYS = ["loss", ("eval_reward_accuracy", "eval_gold_score"), "eval_reward_margin",
                 ("eval_chosen_logps", "eval_rejected_logps"), "eval_kl", "grad_norm"]


def make_mesh(config: ExperimentConfig) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh_shape))


def load_tokenizer(config: ExperimentConfig):
  path = config.tokenizer_path or config.policy_path
  if not path:
    raise ValueError("no tokenizer: set --config.tokenizer_path or --config.policy_path")
  return data_lib.load_tokenizer(path)


def _load(config: ExperimentConfig, path: str, kind: str):
  """A checkpoint with the run's own compute settings (`config.model`: dtypes, remat, logits
  chunking); its architecture comes from its config.json. Each parameter is read straight into
  its sharding on the run's mesh, each process reading only its own devices' slices."""
  m = config.model
  return models.from_pretrained(path, kind=kind, dtype=m.dtype, param_dtype=m.param_dtype,
                                mesh=make_mesh(config), remat=m.remat,
                                logits_chunk_size=m.logits_chunk_size,
                                last_block_rows=m.last_block_rows)


_check_vocab = preflight.check_vocab


def _save(model, tokenizer, path: str) -> None:
  """The model and tokenizer files, each renamed into `path` complete; nothing else there is
  touched (metrics, TensorBoard logs, checkpoints)."""
  if jax.process_index() == 0:
    models.save_pretrained(model, path)
    with fileio.staging_dir(path) as tmp:
      tokenizer.save_pretrained(tmp)


def _train_sft(config: ExperimentConfig, paths: Paths) -> str:
  tokenizer = load_tokenizer(config)
  if config.policy_path:
    policy = _load(config, config.policy_path, "causal_lm")
  else:
    cfg = config.model.replace(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    policy = models.CausalLM(cfg, rngs=nnx.Rngs(config.sft.seed))
  _check_vocab(policy.cfg, tokenizer, "policy")
  examples = data_lib.load_sft(config.sft_data)
  writer = MetricsWriter(paths.sft, "metrics")
  policy, _ = train_sft(policy, tokenizer, examples, config.sft, mesh=make_mesh(config),
                        log_fn=writer.write, checkpoint_dir=_checkpoints(paths.sft),
                        writer=writer, use_chat_template=config.use_chat_template)
  writer.close()
  _save(policy, tokenizer, paths.sft)
  return paths.sft


def _train_reward(config: ExperimentConfig, paths: Paths, policy_path: str) -> str:
  tokenizer = load_tokenizer(config)
  model = _load(config, policy_path, "scalar")
  _check_vocab(model.cfg, tokenizer, "reward model")
  pairs = data_lib.load_preferences(config.preferences)
  writer = MetricsWriter(paths.reward, "metrics")
  model, history, eval_metrics = train_reward_model(
      model, tokenizer, pairs, config.reward, mesh=make_mesh(config), log_fn=writer.write,
      checkpoint_dir=_checkpoints(paths.reward), writer=writer,
      use_chat_template=config.use_chat_template)
  writer.write(history[-1]["step"] if history else 0,
               {f"final_eval_{k}": v for k, v in eval_metrics.items()})
  writer.close()
  _save(model, tokenizer, paths.reward)
  if "accuracy" in eval_metrics:   # none without a held-out set (eval_fraction=0)
    logging.info("reward model held-out accuracy: %.4f", eval_metrics["accuracy"])
  return paths.reward


def needs_reward_model(config: ExperimentConfig) -> bool:
  """Whether PPO reads a reward-model checkpoint: as a reward term, or to initialise a critic."""
  return config.ppo.rewards.uses_reward_model or config.ppo.critic_impl.needs_value_model


def _train_ppo(config: ExperimentConfig, paths: Paths, policy_path: str,
               reward_path: str) -> dict:
  tokenizer = load_tokenizer(config)
  policy = _load(config, policy_path, "causal_lm")
  _check_vocab(policy.cfg, tokenizer, "policy")
  reward_graphdef = reward_params = None
  if config.ppo.rewards.uses_reward_model:
    reward = _load(config, reward_path, "scalar")
    _check_vocab(reward.cfg, tokenizer, "reward model")
    reward_graphdef, reward_params = nnx.split(reward)
  # Critic initialised from the reward model (N implementation details of RLHF).
  value = (_load(config, reward_path, "scalar")
           if config.ppo.critic_impl.needs_value_model else None)
  reward_fn = rewards_lib.make_reward_fn(config.ppo.rewards, tokenizer=tokenizer,
                                         reward_graphdef=reward_graphdef)
  gold_fn = tasks.gold_fn(config)
  writer = MetricsWriter(paths.ppo, "metrics")
  trainer = PPOTrainer(
      config.ppo, policy, tokenizer, data_lib.load_prompts(config.prompts),
      data_lib.load_prompts(config.eval_prompts) if config.eval_prompts else [],
      reward_fn=reward_fn, reward_params=reward_params,
      value_model=value, gold_fn=gold_fn, mesh=make_mesh(config), writer=writer,
      checkpoint_dir=_checkpoints(paths.ppo), use_chat_template=config.use_chat_template)
  final = trainer.train()
  writer.write(int(trainer.state.step), {f"final_{k}": v for k, v in final.items()
                                         if k != "samples"})
  writer.close()
  _save(trainer.policy, tokenizer, paths.policy)   # under LoRA: the adapters merged in
  if jax.process_index() == 0:
    if config.ppo.lora.enabled:   # and as a PEFT adapter over the SFT policy
      lora.save_peft(trainer.adapted_policy, os.path.join(paths.ppo, "adapter"),
                     base_model_name_or_path=os.path.abspath(policy_path))
    records = read_jsonl(writer.path)
    plot_curves(records, PPO_PLOT_KEYS, os.path.join(paths.ppo, "curves.png"), "PPO",
                flag_key="reward_hacking")
    fileio.write_atomic(os.path.join(paths.ppo, "samples.md"),
                        evaluation.samples_table(final.get("samples", [])) + "\n")
  return final


def _train_dpo(config: ExperimentConfig, paths: Paths, policy_path: str) -> dict:
  """Stage 2 of the "dpo" method: preference optimisation (`config.dpo`) of the SFT policy on
  the preference pairs, its reference the SFT policy; writes <workdir>/dpo (the policy's Hugging
  Face checkpoint, metrics.jsonl, curves.png, samples.md). Returns the final evaluation."""
  tokenizer = load_tokenizer(config)
  policy = _load(config, policy_path, "causal_lm")
  _check_vocab(policy.cfg, tokenizer, "policy")
  pairs = data_lib.load_preferences(config.preferences)
  prompts = data_lib.load_prompts(config.eval_prompts) if config.eval_prompts else []
  writer = MetricsWriter(paths.dpo, "metrics")
  policy, history, final = train_dpo(policy, tokenizer, pairs, config.dpo, mesh=make_mesh(config),
                                     log_fn=writer.write, eval_prompts=prompts,
                                     gold_fn=tasks.gold_fn(config),
                                     checkpoint_dir=_checkpoints(paths.dpo), writer=writer,
                                     use_chat_template=config.use_chat_template)
  writer.write(history[-1]["step"], {f"final_{k}": v for k, v in final.items() if k != "samples"})
  writer.close()
  _save(policy, tokenizer, paths.dpo)
  if jax.process_index() == 0:
    plot_curves(read_jsonl(writer.path), DPO_PLOT_KEYS, os.path.join(paths.dpo, "curves.png"),
                f"DPO ({config.dpo.loss.name})")
    fileio.write_atomic(os.path.join(paths.dpo, "samples.md"),
                        evaluation.samples_table(final.get("samples", [])) + "\n")
  return final


def _final_evaluation(stage_dir: str) -> dict:
  """The last evaluation of a finished PPO or DPO stage, as `_train_ppo` / `_train_dpo` logged
  it."""
  for record in reversed(read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))):
    final = {k[len("final_"):]: v for k, v in record.items() if k.startswith("final_")}
    if final:
      return final
  return {}


def _checkpoints(stage_dir: str) -> str:
  return os.path.join(os.path.abspath(stage_dir), "checkpoints")


# --- stage fingerprints (`rlhf_jax.stages`) -----------------------------------------------------

Hasher = Callable[[str], str]


def _input_hash(pending: dict[str, bytes], path: str) -> str:
  """Content hash of an input file or checkpoint directory; files about to be written count
  with their new content."""
  return fileio.bytes_hash(pending[path]) if path in pending else fileio.content_hash(path)


def _fields(prefix: str, cfg: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
  return {f"{prefix}.{k}": v for k, v in checkpointing.config_fingerprint(cfg, ignore).items()}


def _model_fields(config: ExperimentConfig, from_scratch: bool) -> dict[str, Any]:
  """The `config.model` fields a stage uses: all of them for a model built from scratch, the
  compute settings `_load` applies to a loaded checkpoint."""
  if from_scratch:
    return _fields("model", config.model)
  return {f"model.{k}": getattr(config.model, k)
          for k in ("dtype", "param_dtype", "remat", "logits_chunk_size", "last_block_rows")}


def _tokenizer_dir(config: ExperimentConfig) -> str:
  return config.tokenizer_path or config.policy_path


def _sft_stage(config: ExperimentConfig, paths: Paths, h: Hasher) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("sft", config.sft, resume.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=not config.policy_path),
            "sft_data": h(config.sft_data), "tokenizer": h(_tokenizer_dir(config)),
            "use_chat_template": config.use_chat_template,
            "policy": h(config.policy_path) if config.policy_path else "from scratch"}
  return stages_lib.Stage("sft", paths.sft, fingerprint, {},
                          lambda: _train_sft(config, paths), lambda: paths.sft)


def _reward_stage(config: ExperimentConfig, paths: Paths, h: Hasher,
                  policy_path: str) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("reward", config.reward, resume.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=False),
            "preferences": h(config.preferences), "tokenizer": h(_tokenizer_dir(config)),
            "use_chat_template": config.use_chat_template, "policy": h(policy_path)}
  return stages_lib.Stage("reward", paths.reward, fingerprint, {},
                          lambda: _train_reward(config, paths, policy_path),
                          lambda: paths.reward)


def _ppo_stage(config: ExperimentConfig, paths: Paths, h: Hasher, policy_path: str,
               reward_path: str) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("ppo", config.ppo, checkpointing.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=False),
            "prompts": h(config.prompts),
            "eval_prompts": h(config.eval_prompts) if config.eval_prompts else "none",
            "tokenizer": h(_tokenizer_dir(config)), "policy": h(policy_path),
            "use_chat_template": config.use_chat_template,
            "reward_model": h(reward_path) if reward_path else "none"}
  # A finished run given more steps (or another threshold) resumes from its last checkpoint.
  budget = {"ppo.max_steps": config.ppo.max_steps,
            "ppo.reward_threshold": config.ppo.reward_threshold}
  return stages_lib.Stage("ppo", paths.ppo, fingerprint, budget,
                          lambda: _train_ppo(config, paths, policy_path, reward_path),
                          lambda: _final_evaluation(paths.ppo))


def _dpo_stage(config: ExperimentConfig, paths: Paths, h: Hasher,
               policy_path: str) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("dpo", config.dpo, resume.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=False),
            "preferences": h(config.preferences),
            "eval_prompts": h(config.eval_prompts) if config.eval_prompts else "none",
            "tokenizer": h(_tokenizer_dir(config)), "policy": h(policy_path),
            "use_chat_template": config.use_chat_template}
  return stages_lib.Stage("dpo", paths.dpo, fingerprint, {},
                          lambda: _train_dpo(config, paths, policy_path),
                          lambda: _final_evaluation(paths.dpo))


def _execute(config: ExperimentConfig, paths: Paths,
             plan: Callable[[ExperimentConfig, Hasher], list[stages_lib.Stage]]) -> list[Any]:
  """Runs `plan`'s stages (`stages_lib.run`), the built-in task's files written only once every
  stage has been checked."""
  os.makedirs(paths.workdir, exist_ok=True)
  config, pending = tasks.materialize(config, paths)
  return stages_lib.run(plan(config, functools.partial(_input_hash, pending)), config.overwrite,
                        before=lambda: tasks.write(pending))


def run_sft(config: ExperimentConfig, paths: Paths) -> str:
  """Stage 1: supervised fine-tuning; writes <workdir>/sft. Returns the checkpoint path.
  A policy trained from scratch is initialised from `config.sft.seed`."""
  return _execute(config, paths, lambda c, h: [_sft_stage(c, paths, h)])[0]


def run_reward(config: ExperimentConfig, paths: Paths, policy_path: str) -> str:
  """Stage 2: Bradley-Terry reward model from the SFT trunk; writes <workdir>/reward."""
  return _execute(config, paths, lambda c, h: [_reward_stage(c, paths, h, policy_path)])[0]


def run_ppo(config: ExperimentConfig, paths: Paths, policy_path: str, reward_path: str) -> dict:
  """Stage 3: PPO from the SFT policy against `config.ppo.rewards` (the reward model by
  default); writes <workdir>/ppo. `reward_path` may be "" when no reward model is needed.

  Checkpoints go to <workdir>/ppo/checkpoints; a rerun with the same workdir resumes from them.
  The trained policy goes to <workdir>/ppo/policy; under LoRA (`ppo.lora.rank` > 0) with the
  adapters merged, and also as a PEFT adapter directory <workdir>/ppo/adapter.
  """
  if needs_reward_model(config) and not reward_path:
    raise ValueError(f"ppo.rewards.terms={config.ppo.rewards.terms!r} with "
                     f"ppo.critic={config.ppo.critic!r} needs a reward model: set "
                     "--config.reward_path")
  return _execute(config, paths,
                  lambda c, h: [_ppo_stage(c, paths, h, policy_path, reward_path)])[0]


def run_dpo(config: ExperimentConfig, paths: Paths, policy_path: str) -> dict:
  """Stage 2 of the "dpo" method: preference optimisation (`config.dpo`) of the SFT policy on
  the preference pairs, its reference the SFT policy; writes <workdir>/dpo (the policy's Hugging
  Face checkpoint, metrics.jsonl, curves.png, samples.md). Returns the final evaluation."""
  return _execute(config, paths, lambda c, h: [_dpo_stage(c, paths, h, policy_path)])[0]


def stages(config: ExperimentConfig) -> tuple[str, ...]:
  """The stages `run_all` runs: SFT unless a policy is given (and no SFT data of your own), then
  the reward model unless one is given or none is needed and PPO, or DPO with `method="dpo"`."""
  sft = not config.policy_path or (config.sft_data and config.task.name == "")
  if config.method == "dpo":
    return ("sft",) * bool(sft) + ("dpo",)
  reward = not config.reward_path and needs_reward_model(config)
  return ("sft",) * bool(sft) + ("reward",) * reward + ("ppo",)


def run_all(config: ExperimentConfig, workdir: str) -> dict:
  """SFT -> reward model -> PPO (or SFT -> DPO), skipping stages whose checkpoint the config
  provides. Every stage's inputs are checked (`preflight.check_run`) and every stage's
  fingerprint is compared with what the workdir holds before the first stage writes anything."""
  run = stages(config)
  preflight.check_run(config, workdir, run)
  paths = Paths(workdir)

  def plan(config: ExperimentConfig, h: Hasher) -> list[stages_lib.Stage]:
    planned = []
    policy_path, reward_path = config.policy_path, config.reward_path
    if "sft" in run:
      planned.append(_sft_stage(config, paths, h))
      policy_path = paths.sft
    if "dpo" in run:
      return planned + [_dpo_stage(config, paths, h, policy_path)]
    if "reward" in run:
      planned.append(_reward_stage(config, paths, h, policy_path))
      reward_path = paths.reward
    return planned + [_ppo_stage(config, paths, h, policy_path, reward_path)]

  final = _execute(config, paths, plan)[-1]
  logging.info("final evaluation: %s", {k: v for k, v in final.items() if k != "samples"})
  return final


def summary(records: list[dict]) -> dict:
  """First/last values of the headline PPO curves (for logs and the README)."""
  def first_last(key):
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return (vals[0], vals[-1]) if vals else None
  return {k: first_last(k) for k in ("raw_score_mean", "eval_reward", "gold_score", "kl")
          if first_last(k) is not None and np.isfinite(first_last(k)[0])}


