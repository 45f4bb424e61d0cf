"""The three stages of RLHF driven by one ml_collections config: SFT, reward model, PPO.

The `experiments/*.py` mains are thin wrappers around these functions. Each stage reads its inputs
from paths in the config (or what the previous stage wrote into the workdir) and writes Hugging Face
checkpoints, so stages can run alone, in order, or on users' own checkpoints and data.
"""

import dataclasses
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import data as data_lib
from rlhf_jax import evaluation
from rlhf_jax import kl as kl_lib
from rlhf_jax import losses, models, ppo, sharding
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.metrics import MetricsWriter, plot_curves, read_jsonl
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.score import reward_model_fn
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig

# The reward-model score and the gold score share a panel: their divergence is reward hacking.
PPO_PLOT_KEYS = ["raw_score_mean", ("eval_reward", "gold_score"), "kl", "entropy", "approx_kl",
                 "clipfrac", "value_loss", "explained_variance", "eval_win_rate",
                 "response_length", "tokens_per_s"]


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where a run's inputs and outputs live."""
  workdir: str

  def __getattr__(self, name):
    sub = {"data": "data", "tokenizer": "tokenizer", "sft": "sft", "reward": "reward",
           "ppo": "ppo", "policy": os.path.join("ppo", "policy")}
    if name in sub:
      return os.path.join(self.workdir, sub[name])
    raise AttributeError(name)


def make_mesh(config) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh_shape))


def prepare_default_task(config, paths: Paths) -> None:
  """Writes the built-in task's data files and tokenizer into the workdir and points the config
  at them, so the default run reads data through the same loaders as users' files."""
  if config.task != "default":
    if config.task:
      raise ValueError(f"unknown task {config.task!r}: use 'default' or '' with data paths")
    return
  n = max(config.sft.num_examples, 1)
  task = data_lib.make_default_task(
      seed=config.seed, n_sft=n, n_pairs=config.reward.num_pairs,
      n_prompts=config.ppo.num_prompts, n_eval_prompts=config.ppo.num_eval_prompts,
      label_temperature=config.reward.label_temperature)
  if jax.process_index() == 0:
    files = data_lib.write_default_task(task, paths.data)
    if not os.path.isdir(paths.tokenizer):
      data_lib.build_tokenizer(data_lib.vocabulary(), paths.tokenizer)
  else:   # every process derives the same file names; process 0 writes them
    files = data_lib.DefaultTaskFiles(*(os.path.join(paths.data, f) for f in (
        "sft.jsonl", "preferences.jsonl", "train_prompts.jsonl", "eval_prompts.jsonl")))
  config.sft_data = config.sft_data or files.sft
  config.preferences = config.preferences or files.preferences
  config.prompts = config.prompts or files.train_prompts
  config.eval_prompts = config.eval_prompts or files.eval_prompts
  config.tokenizer_path = config.tokenizer_path or paths.tokenizer


def load_tokenizer(config):
  from transformers import AutoTokenizer
  path = config.tokenizer_path or config.policy_path
  if not path:
    raise ValueError("no tokenizer: set --config.tokenizer_path or --config.policy_path")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  data_lib.check_tokenizer(tok)
  return tok


def _check_vocab(model_cfg: models.DecoderConfig, tokenizer, what: str) -> None:
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"{what}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                     f"has {model_cfg.vocab_size}; they do not belong together")


def _save(model, tokenizer, path: str) -> None:
  if jax.process_index() == 0:
    models.save_pretrained(model, path)
    tokenizer.save_pretrained(path)


def run_sft(config, paths: Paths):
  """Stage 1: supervised fine-tuning; writes <workdir>/sft. Returns the checkpoint path."""
  from rlhf_jax.trainers.sft import SFTConfig, train_sft
  tokenizer = load_tokenizer(config)
  if config.policy_path:
    policy = models.from_pretrained(config.policy_path, kind="causal_lm", dtype=config.dtype)
  else:
    cfg = models.DecoderConfig(
        **config.model.to_dict(), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype=config.dtype)
    policy = models.CausalLM(cfg, rngs=nnx.Rngs(config.seed))
  _check_vocab(policy.cfg, tokenizer, "policy")
  examples = data_lib.load_sft(config.sft_data)
  s = config.sft
  sft_cfg = SFTConfig(batch_size=s.batch_size, epochs=s.epochs, max_len=s.max_len,
                      eval_fraction=s.eval_fraction, seed=config.seed,
                      optim=OptimConfig(learning_rate=s.learning_rate, schedule="cosine",
                                        warmup_steps=s.warmup_steps))
  writer = MetricsWriter(paths.sft, "metrics")
  policy, _ = train_sft(policy, tokenizer, examples, sft_cfg, mesh=make_mesh(config),
                        log_fn=writer.write)
  writer.close()
  _save(policy, tokenizer, paths.sft)
  return paths.sft


def run_reward(config, paths: Paths, policy_path: str) -> str:
  """Stage 2: Bradley-Terry reward model from the SFT trunk; writes <workdir>/reward."""
  from rlhf_jax.trainers.reward import RewardConfig, train_reward_model
  tokenizer = load_tokenizer(config)
  model = models.from_pretrained(policy_path, kind="scalar", dtype=config.dtype)
  _check_vocab(model.cfg, tokenizer, "reward model")
  pairs = data_lib.load_preferences(config.preferences)
  r = config.reward
  rm_cfg = RewardConfig(batch_size=r.batch_size, epochs=r.epochs, max_len=r.max_len,
                        eval_fraction=r.eval_fraction, seed=config.seed,
                        center_coef=r.center_coef,
                        optim=OptimConfig(learning_rate=r.learning_rate, schedule="cosine",
                                          warmup_steps=r.warmup_steps))
  writer = MetricsWriter(paths.reward, "metrics")
  model, history, eval_metrics = train_reward_model(model, tokenizer, pairs, rm_cfg,
                                                    mesh=make_mesh(config), log_fn=writer.write)
  writer.write(history[-1]["step"] if history else 0,
               {f"final_eval_{k}": v for k, v in eval_metrics.items()})
  writer.close()
  logging.info("reward model held-out accuracy: %.4f", eval_metrics["accuracy"])
  _save(model, tokenizer, paths.reward)
  return paths.reward


def ppo_trainer_config(config) -> PPOTrainerConfig:
  p = config.ppo
  return PPOTrainerConfig(
      sampling=SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p, decode_layout=p.decode_layout),
      group_size=p.group_size,
      policy_loss=losses.PolicyLossConfig(name=p.policy_loss, clip_eps=p.clip_eps),
      value_loss=losses.ValueLossConfig(name=p.value_loss, clip_eps=p.value_clip_eps),
      advantage=AdvantageConfig(estimator=p.advantage, gamma=p.gamma, lam=p.lam),
      kl=kl_lib.KLConfig(estimator=p.kl_estimator, in_reward=p.kl_in_reward,
                         init_coef=p.kl_coef, controller=p.kl_controller, target=p.kl_target,
                         horizon=p.kl_horizon),
      critic=p.critic, ppo_epochs=p.ppo_epochs, num_minibatches=p.num_minibatches,
      vf_coef=p.vf_coef, ent_coef=p.ent_coef, whiten_advantages=p.whiten_advantages,
      missing_eos_penalty=p.missing_eos_penalty, whiten_scores=p.whiten_scores,
      batch_size=p.batch_size, max_prompt_len=p.max_prompt_len,
      max_steps=p.max_steps, reward_threshold=p.reward_threshold, eval_every=p.eval_every,
      num_eval_prompts=p.num_eval_prompts, normalize_reward=p.normalize_reward,
      seed=config.seed, checkpoint_every=p.checkpoint_every,
      keep_checkpoints=p.keep_checkpoints, max_nonfinite_iterations=p.max_nonfinite_iterations,
      optim=OptimConfig(learning_rate=p.learning_rate, schedule=p.lr_schedule,
                        max_grad_norm=p.max_grad_norm))


def run_ppo(config, paths: Paths, policy_path: str, reward_path: str) -> dict:
  """Stage 3: PPO from the SFT policy against the reward model; writes <workdir>/ppo.

  Checkpoints go to <workdir>/ppo/checkpoints; a rerun with the same workdir resumes from them.
  """
  tokenizer = load_tokenizer(config)
  tcfg = ppo_trainer_config(config)
  policy = models.from_pretrained(policy_path, kind="causal_lm", dtype=config.dtype)
  reward = models.from_pretrained(reward_path, kind="scalar", dtype=config.dtype)
  _check_vocab(policy.cfg, tokenizer, "policy")
  _check_vocab(reward.cfg, tokenizer, "reward model")
  # Critic initialised from the reward model (N implementation details of RLHF).
  value = (models.from_pretrained(reward_path, kind="scalar", dtype=config.dtype)
           if tcfg.critic_impl.needs_value_model else None)
  reward_graphdef, reward_params = nnx.split(reward)
  gold_fn = data_lib.gold_score if config.task == "default" else None
  writer = MetricsWriter(paths.ppo, "metrics")
  trainer = PPOTrainer(
      tcfg, policy, tokenizer, data_lib.load_prompts(config.prompts),
      data_lib.load_prompts(config.eval_prompts) if config.eval_prompts else [],
      reward_fn=reward_model_fn(reward_graphdef), reward_params=reward_params,
      value_model=value, gold_fn=gold_fn, mesh=make_mesh(config), writer=writer,
      checkpoint_dir=os.path.join(os.path.abspath(paths.ppo), "checkpoints"))
  final = trainer.train()
  writer.write(int(trainer.state.step), {f"final_{k}": v for k, v in final.items()
                                         if k != "samples"})
  writer.close()
  _save(trainer.policy, tokenizer, paths.policy)
  if jax.process_index() == 0:
    records = read_jsonl(writer.path)
    plot_curves(records, PPO_PLOT_KEYS, os.path.join(paths.ppo, "curves.png"), "PPO",
                flag_key="reward_hacking")
    with open(os.path.join(paths.ppo, "samples.md"), "w") as f:
      f.write(evaluation.samples_table(final.get("samples", [])) + "\n")
  return final


def run_all(config, workdir: str) -> dict:
  """SFT -> reward model -> PPO, skipping stages whose checkpoint the config provides."""
  ppo_trainer_config(config)  # a bad PPO setting fails here, before SFT and reward training
  paths = Paths(workdir)
  os.makedirs(workdir, exist_ok=True)
  prepare_default_task(config, paths)
  policy_path = config.policy_path
  if not policy_path or (config.sft_data and config.task != "default"):
    policy_path = run_sft(config, paths)
  reward_path = config.reward_path or run_reward(config, paths, policy_path)
  final = run_ppo(config, paths, policy_path, reward_path)
  logging.info("final evaluation: %s", {k: v for k, v in final.items() if k != "samples"})
  return final


def summary(records: list[dict]) -> dict:
  """First/last values of the headline PPO curves (for logs and the README)."""
  def first_last(key):
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return (vals[0], vals[-1]) if vals else None
  return {k: first_last(k) for k in ("raw_score_mean", "eval_reward", "gold_score", "kl")
          if first_last(k) is not None and np.isfinite(first_last(k)[0])}


