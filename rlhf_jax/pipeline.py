"""The three stages of RLHF driven by one typed config tree: SFT, reward model, PPO.

`ExperimentConfig` holds every stage's dataclass (`sft`, `reward`, `ppo`, `model`), and the command
line edits its mirror ConfigDict (`--config.ppo.kl.init_coef=0.2`, see `rlhf_jax.config_tree`).
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
from rlhf_jax import evaluation, models, sharding
from rlhf_jax.metrics import MetricsWriter, plot_curves, read_jsonl
from rlhf_jax.models import lora
from rlhf_jax.score import reward_model_fn
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig
from rlhf_jax.trainers.reward import RewardConfig, train_reward_model
from rlhf_jax.trainers.sft import SFTConfig, train_sft

# The reward-model score and the gold score share a panel: their divergence is reward hacking.
PPO_PLOT_KEYS = ["raw_score_mean", ("eval_reward", "gold_score"), "kl", "entropy", "approx_kl",
                 "clipfrac", "value_loss", "explained_variance", "eval_win_rate",
                 "response_length", "tokens_per_s"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The built-in task (`rlhf_jax.data.synthetic`), written into <workdir>/data.

  Attributes:
    name: "default": the built-in task; "": your own data (the paths in `ExperimentConfig`).
    seed: Seed of the task's corpus, pairs, labels and prompts.
    num_sft: SFT demonstrations.
    num_pairs: Preference pairs.
    num_prompts: PPO training prompts (the evaluation prompts number `ppo.num_eval_prompts`).
    label_temperature: Bradley-Terry temperature of the simulated labeler's choices.
  """
  name: str = "default"
  seed: int = 0
  num_sft: int = 6000
  num_pairs: int = 10000
  num_prompts: int = 4096
  label_temperature: float = 0.1

  def __post_init__(self):
    if self.name not in ("default", ""):
      raise ValueError(f"unknown task {self.name!r}: use 'default' or '' with data paths")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One RLHF run: data, models, and each stage's config.

  Attributes:
    task: The built-in task; with `task.name=""` the data paths below are yours.
    mesh_shape: Mesh over (data, fsdp, tensor); one -1 takes the remaining devices.
    prompts, eval_prompts, sft_data, preferences: Data files (JSONL / text / parquet /
      datasets-on-disk); empty: the built-in task's.
    use_chat_template: Render prompts with the tokenizer's chat template. Not read by any stage
      yet (nor before this tree): `data.encode_prompts` supports it, the trainers do not pass it.
    policy_path, reward_path: Local Hugging Face checkpoints; empty: the stage trains one (SFT
      from scratch with `model`, the reward model from the SFT policy's trunk).
    tokenizer_path: Default: the policy checkpoint's directory (or the built-in task's).
    gold_judge: "package.module:function", a text -> score judge the policy never sees (logged as
      gold_score, read by the reward-hacking monitor); empty: the built-in task's labeler
      (`data.gold_score`), or none on your own data, where the monitor has KL and distinct-n only.
    model: The from-scratch architecture; vocab_size and the pad / EOS ids come from the
      tokenizer. Its dtype and param_dtype also apply to loaded checkpoints.
    sft, reward, ppo: The stages (`rlhf_jax.trainers`).
  """
  task: TaskConfig = TaskConfig()
  mesh_shape: tuple[int, ...] = (-1, 1, 1)
  prompts: str = ""
  eval_prompts: str = ""
  sft_data: str = ""
  preferences: str = ""
  use_chat_template: bool = False
  policy_path: str = ""
  reward_path: str = ""
  tokenizer_path: str = ""
  gold_judge: str = ""
  model: models.DecoderConfig = models.DecoderConfig()
  sft: SFTConfig = SFTConfig()
  reward: RewardConfig = RewardConfig()
  ppo: PPOTrainerConfig = PPOTrainerConfig()


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


def make_mesh(config: ExperimentConfig) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh_shape))


def prepare_default_task(config: ExperimentConfig, paths: Paths) -> ExperimentConfig:
  """Writes the built-in task's data files and tokenizer into the workdir; returns the config
  pointed at them, so the default run reads data through the same loaders as users' files."""
  t = config.task
  if t.name != "default":
    return config
  task = data_lib.make_default_task(
      seed=t.seed, n_sft=max(t.num_sft, 1), n_pairs=t.num_pairs, n_prompts=t.num_prompts,
      n_eval_prompts=config.ppo.num_eval_prompts, label_temperature=t.label_temperature)
  if jax.process_index() == 0:
    files = data_lib.write_default_task(task, paths.data)
    if not os.path.isdir(paths.tokenizer):
      data_lib.build_tokenizer(data_lib.vocabulary(), paths.tokenizer)
  else:   # every process derives the same file names; process 0 writes them
    files = data_lib.DefaultTaskFiles(*(os.path.join(paths.data, f) for f in (
        "sft.jsonl", "preferences.jsonl", "train_prompts.jsonl", "eval_prompts.jsonl")))
  return dataclasses.replace(
      config, sft_data=config.sft_data or files.sft,
      preferences=config.preferences or files.preferences,
      prompts=config.prompts or files.train_prompts,
      eval_prompts=config.eval_prompts or files.eval_prompts,
      tokenizer_path=config.tokenizer_path or paths.tokenizer)


def load_tokenizer(config: ExperimentConfig):
  from transformers import AutoTokenizer
  path = config.tokenizer_path or config.policy_path
  if not path:
    raise ValueError("no tokenizer: set --config.tokenizer_path or --config.policy_path")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  data_lib.check_tokenizer(tok)
  return tok


def _load(config: ExperimentConfig, path: str, kind: str):
  """A checkpoint with the run's own compute settings (`config.model`: dtypes, remat, logits
  chunking); its architecture comes from its config.json."""
  m = config.model
  return models.from_pretrained(path, kind=kind, dtype=m.dtype, param_dtype=m.param_dtype,
                                remat=m.remat, logits_chunk_size=m.logits_chunk_size)


def _check_vocab(model_cfg: models.DecoderConfig, tokenizer, what: str) -> None:
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"{what}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                     f"has {model_cfg.vocab_size}; they do not belong together")


def _save(model, tokenizer, path: str) -> None:
  if jax.process_index() == 0:
    models.save_pretrained(model, path)
    tokenizer.save_pretrained(path)


def run_sft(config: ExperimentConfig, paths: Paths) -> str:
  """Stage 1: supervised fine-tuning; writes <workdir>/sft. Returns the checkpoint path.
  A policy trained from scratch is initialised from `config.sft.seed`."""
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
                        log_fn=writer.write)
  writer.close()
  _save(policy, tokenizer, paths.sft)
  return paths.sft


def run_reward(config: ExperimentConfig, paths: Paths, policy_path: str) -> str:
  """Stage 2: Bradley-Terry reward model from the SFT trunk; writes <workdir>/reward."""
  tokenizer = load_tokenizer(config)
  model = _load(config, policy_path, "scalar")
  _check_vocab(model.cfg, tokenizer, "reward model")
  pairs = data_lib.load_preferences(config.preferences)
  writer = MetricsWriter(paths.reward, "metrics")
  model, history, eval_metrics = train_reward_model(model, tokenizer, pairs, config.reward,
                                                    mesh=make_mesh(config), log_fn=writer.write)
  writer.write(history[-1]["step"] if history else 0,
               {f"final_eval_{k}": v for k, v in eval_metrics.items()})
  writer.close()
  logging.info("reward model held-out accuracy: %.4f", eval_metrics["accuracy"])
  _save(model, tokenizer, paths.reward)
  return paths.reward


def run_ppo(config: ExperimentConfig, paths: Paths, policy_path: str, reward_path: str) -> dict:
  """Stage 3: PPO from the SFT policy against the reward model; writes <workdir>/ppo.

  Checkpoints go to <workdir>/ppo/checkpoints; a rerun with the same workdir resumes from them.
  The trained policy goes to <workdir>/ppo/policy; under LoRA (`ppo.lora.rank` > 0) with the
  adapters merged, and also as a PEFT adapter directory <workdir>/ppo/adapter.
  """
  tokenizer = load_tokenizer(config)
  policy = _load(config, policy_path, "causal_lm")
  reward = _load(config, reward_path, "scalar")
  _check_vocab(policy.cfg, tokenizer, "policy")
  _check_vocab(reward.cfg, tokenizer, "reward model")
  # Critic initialised from the reward model (N implementation details of RLHF).
  value = (_load(config, reward_path, "scalar")
           if config.ppo.critic_impl.needs_value_model else None)
  reward_graphdef, reward_params = nnx.split(reward)
  gold_fn = (evaluation.load_gold_judge(config.gold_judge) if config.gold_judge
             else data_lib.gold_score if config.task.name == "default" else None)
  writer = MetricsWriter(paths.ppo, "metrics")
  trainer = PPOTrainer(
      config.ppo, policy, tokenizer, data_lib.load_prompts(config.prompts),
      data_lib.load_prompts(config.eval_prompts) if config.eval_prompts else [],
      reward_fn=reward_model_fn(reward_graphdef), reward_params=reward_params,
      value_model=value, gold_fn=gold_fn, mesh=make_mesh(config), writer=writer,
      checkpoint_dir=os.path.join(os.path.abspath(paths.ppo), "checkpoints"))
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
    with open(os.path.join(paths.ppo, "samples.md"), "w") as f:
      f.write(evaluation.samples_table(final.get("samples", [])) + "\n")
  return final


def run_all(config: ExperimentConfig, workdir: str) -> dict:
  """SFT -> reward model -> PPO, skipping stages whose checkpoint the config provides."""
  paths = Paths(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = prepare_default_task(config, paths)
  policy_path = config.policy_path
  if not policy_path or (config.sft_data and config.task.name != "default"):
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


