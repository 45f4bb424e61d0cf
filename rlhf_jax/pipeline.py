"""The three stages of RLHF driven by one typed config tree: SFT, reward model, PPO.

`ExperimentConfig` holds every stage's dataclass (`sft`, `reward`, `ppo`, `model`), and the command
line edits its mirror ConfigDict (`--config.ppo.kl.init_coef=0.2`, see `rlhf_jax.config_tree`).
The `experiments/*.py` mains are thin wrappers around these functions. Each stage reads its inputs
from paths in the config (or what the previous stage wrote into the workdir) and writes Hugging Face
checkpoints, so stages can run alone, in order, or on users' own checkpoints and data.

Every stage is resumable and idempotent (`rlhf_jax.stages`): it checkpoints as it trains, records
a fingerprint of its config and inputs in `<stage>/stage.json`, and a rerun in the same workdir
skips it when finished with the same fingerprint, resumes it when unfinished, and refuses before
anything is written when the fingerprint differs (`overwrite=True` starts over).
"""

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import data as data_lib
from rlhf_jax import checkpointing, evaluation, fileio, models, sharding
from rlhf_jax import stages as stages_lib
from rlhf_jax.metrics import MetricsWriter, plot_curves, read_jsonl
from rlhf_jax.score import reward_model_fn
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig
from rlhf_jax.trainers import resume
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
    overwrite: Start every stage of this run over, even where the workdir holds a finished or
      partly trained one (default: skip a finished stage with the same fingerprint, resume an
      unfinished one, refuse one trained with other settings or inputs).
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
  overwrite: bool = False


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


def _default_task(config: ExperimentConfig, paths: Paths) -> tuple[ExperimentConfig, dict]:
  """The config pointed at the built-in task's data files in the workdir, and those files'
  contents {path: bytes}, not yet written: a run refused for a changed setting leaves the workdir
  as it was. The tokenizer (the same for every task seed) is built when missing."""
  t = config.task
  if t.name != "default":
    return config, {}
  task = data_lib.make_default_task(
      seed=t.seed, n_sft=max(t.num_sft, 1), n_pairs=t.num_pairs, n_prompts=t.num_prompts,
      n_eval_prompts=config.ppo.num_eval_prompts, label_temperature=t.label_temperature)
  contents = {}
  with tempfile.TemporaryDirectory() as tmp:
    for f in data_lib.write_default_task(task, tmp):
      with open(f, "rb") as fh:
        contents[os.path.join(paths.data, os.path.basename(f))] = fh.read()
  files = data_lib.DefaultTaskFiles(*contents)
  if jax.process_index() == 0 and not os.path.isdir(paths.tokenizer):
    data_lib.build_tokenizer(data_lib.vocabulary(), paths.tokenizer)
  return dataclasses.replace(
      config, sft_data=config.sft_data or files.sft,
      preferences=config.preferences or files.preferences,
      prompts=config.prompts or files.train_prompts,
      eval_prompts=config.eval_prompts or files.eval_prompts,
      tokenizer_path=config.tokenizer_path or paths.tokenizer), contents


def _write_task(contents: dict[str, bytes]) -> None:
  """Writes the files whose content differs from what is on disk (a rerun touches none)."""
  if jax.process_index() != 0:
    return
  for path, data in contents.items():
    if fileio.content_hash(path) != fileio.bytes_hash(data):
      fileio.write_atomic(path, data)


def prepare_default_task(config: ExperimentConfig, paths: Paths) -> ExperimentConfig:
  """Writes the built-in task's data files and tokenizer into the workdir; returns the config
  pointed at them, so the default run reads data through the same loaders as users' files."""
  config, contents = _default_task(config, paths)
  _write_task(contents)
  return config


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
                        writer=writer)
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
      checkpoint_dir=_checkpoints(paths.reward), writer=writer)
  writer.write(history[-1]["step"] if history else 0,
               {f"final_eval_{k}": v for k, v in eval_metrics.items()})
  writer.close()
  _save(model, tokenizer, paths.reward)
  if "accuracy" in eval_metrics:   # none without a held-out set (eval_fraction=0)
    logging.info("reward model held-out accuracy: %.4f", eval_metrics["accuracy"])
  return paths.reward


def _train_ppo(config: ExperimentConfig, paths: Paths, policy_path: str,
               reward_path: str) -> dict:
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
      checkpoint_dir=_checkpoints(paths.ppo))
  final = trainer.train()
  writer.write(int(trainer.state.step), {f"final_{k}": v for k, v in final.items()
                                         if k != "samples"})
  writer.close()
  _save(trainer.policy, tokenizer, paths.policy)
  if jax.process_index() == 0:
    records = read_jsonl(writer.path)
    plot_curves(records, PPO_PLOT_KEYS, os.path.join(paths.ppo, "curves.png"), "PPO",
                flag_key="reward_hacking")
    fileio.write_atomic(os.path.join(paths.ppo, "samples.md"),
                        evaluation.samples_table(final.get("samples", [])) + "\n")
  return final


def _final_evaluation(paths: Paths) -> dict:
  """The last evaluation of a finished PPO stage, as `_train_ppo` logged it."""
  for record in reversed(read_jsonl(os.path.join(paths.ppo, "metrics.jsonl"))):
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
          for k in ("dtype", "param_dtype", "remat", "logits_chunk_size")}


def _tokenizer_dir(config: ExperimentConfig) -> str:
  return config.tokenizer_path or config.policy_path


def _sft_stage(config: ExperimentConfig, paths: Paths, h: Hasher) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("sft", config.sft, resume.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=not config.policy_path),
            "sft_data": h(config.sft_data), "tokenizer": h(_tokenizer_dir(config)),
            "policy": h(config.policy_path) if config.policy_path else "from scratch"}
  return stages_lib.Stage("sft", paths.sft, fingerprint, {},
                          lambda: _train_sft(config, paths), lambda: paths.sft)


def _reward_stage(config: ExperimentConfig, paths: Paths, h: Hasher,
                  policy_path: str) -> stages_lib.Stage:
  def fingerprint():
    return {**_fields("reward", config.reward, resume.RESUMABLE_FIELDS),
            **_model_fields(config, from_scratch=False),
            "preferences": h(config.preferences), "tokenizer": h(_tokenizer_dir(config)),
            "policy": h(policy_path)}
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
            "reward_model": h(reward_path)}
  # A finished run given more steps (or another threshold) resumes from its last checkpoint.
  budget = {"ppo.max_steps": config.ppo.max_steps,
            "ppo.reward_threshold": config.ppo.reward_threshold}
  return stages_lib.Stage("ppo", paths.ppo, fingerprint, budget,
                          lambda: _train_ppo(config, paths, policy_path, reward_path),
                          lambda: _final_evaluation(paths))


def _execute(config: ExperimentConfig, paths: Paths,
             plan: Callable[[ExperimentConfig, Hasher], list[stages_lib.Stage]]) -> list[Any]:
  """Runs `plan`'s stages (`stages_lib.run`), the built-in task's files written only once every
  stage has been checked."""
  os.makedirs(paths.workdir, exist_ok=True)
  config, pending = _default_task(config, paths)
  return stages_lib.run(plan(config, functools.partial(_input_hash, pending)), config.overwrite,
                        before=lambda: _write_task(pending))


def run_sft(config: ExperimentConfig, paths: Paths) -> str:
  """Stage 1: supervised fine-tuning; writes <workdir>/sft. Returns the checkpoint path.
  A policy trained from scratch is initialised from `config.sft.seed`."""
  return _execute(config, paths, lambda c, h: [_sft_stage(c, paths, h)])[0]


def run_reward(config: ExperimentConfig, paths: Paths, policy_path: str) -> str:
  """Stage 2: Bradley-Terry reward model from the SFT trunk; writes <workdir>/reward."""
  return _execute(config, paths, lambda c, h: [_reward_stage(c, paths, h, policy_path)])[0]


def run_ppo(config: ExperimentConfig, paths: Paths, policy_path: str, reward_path: str) -> dict:
  """Stage 3: PPO from the SFT policy against the reward model; writes <workdir>/ppo.

  Checkpoints go to <workdir>/ppo/checkpoints; a rerun with the same workdir resumes from them.
  """
  return _execute(config, paths,
                  lambda c, h: [_ppo_stage(c, paths, h, policy_path, reward_path)])[0]


def run_all(config: ExperimentConfig, workdir: str) -> dict:
  """SFT -> reward model -> PPO, skipping stages whose checkpoint the config provides."""
  paths = Paths(workdir)

  def plan(config: ExperimentConfig, h: Hasher) -> list[stages_lib.Stage]:
    stages = []
    policy_path = config.policy_path
    if not policy_path or (config.sft_data and config.task.name != "default"):
      stages.append(_sft_stage(config, paths, h))
      policy_path = paths.sft
    reward_path = config.reward_path
    if not reward_path:
      stages.append(_reward_stage(config, paths, h, policy_path))
      reward_path = paths.reward
    return stages + [_ppo_stage(config, paths, h, policy_path, reward_path)]

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


