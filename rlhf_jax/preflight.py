"""Every check of a run that needs no training, done before any stage writes or trains.

A check of one config dataclass lives in its `__post_init__` and has run when the config tree was
built (`config_tree.from_config_dict`). `check_run` does the rest, those that need several stages,
the tokenizer, a checkpoint's config.json or the data: the mesh fits the devices; the tokenizer
and checkpoints load (each problem naming its file); the tokenizer has a chat template when
`use_chat_template` asks for one; the reward checkpoint is a reward model; a from-scratch model
can be exported as its family; the tokenizer fits each model's vocabulary and `top_k` the
policy's; each stage's lengths fit its model's positions; the data files parse, encode as the
stages will (through the chat template too), their completions fit `max_len` and they fill a
batch after the held-out split; the gold judge imports.
So a bad setting of the last stage fails in seconds, before the first has trained.
"""

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from rlhf_jax import data as data_lib
from rlhf_jax import evaluation, models, sharding
from rlhf_jax.data import arithmetic
from rlhf_jax.trainers import dpo as dpo_lib
from rlhf_jax.trainers import reward as reward_lib
from rlhf_jax.trainers import sft as sft_lib
from rlhf_jax.trainers import supervised

STAGES = ("sft", "reward", "ppo", "dpo")


@dataclasses.dataclass(frozen=True)
class _Model:
  """A model a stage trains or reads: its config and where that config came from."""
  cfg: models.DecoderConfig
  source: str   # "--config.model" or a checkpoint directory


def check_run(config: Any, workdir: str, stages: Sequence[str]) -> None:
  """Raises (ValueError or FileNotFoundError, naming the field, file or stage) unless the
  `stages` of `config` (a `pipeline.ExperimentConfig`) can run in `workdir`; reads, never writes."""
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown stages {sorted(unknown)} (known: {', '.join(STAGES)})")
  sharding.make_mesh(tuple(config.mesh_shape))
  tokenizer = _tokenizer(config, workdir)
  _check_chat_template(config, tokenizer)
  policy = _policy(config, tokenizer)
  check_vocab(policy.cfg, tokenizer, f"policy {policy.source}")
  if config.gold_judge and ("ppo" in stages or "dpo" in stages):
    evaluation.load_gold_judge(config.gold_judge)
  if "sft" in stages:
    _check_max_len("sft", config.sft.max_len, policy)
    path = _data_path(config, "sft_data")
    rows = (max(config.task.num_sft, 1) if path is None else
            _encoded_rows("sft", path, lambda: sft_lib.encode_examples(
                tokenizer, data_lib.load_sft(path), config.sft, config.use_chat_template), policy))
    _check_rows("sft", rows, config.sft)
  # The reward model starts from the policy's trunk; DPO from the policy itself.
  for stage, encode in (("reward", reward_lib.encode_pairs), ("dpo", dpo_lib.encode_pairs)):
    if stage in stages:
      _check_pair_stage(config, stage, encode, tokenizer, policy)
  if "dpo" in stages and config.dpo.sampling.top_k > policy.cfg.vocab_size:
    raise ValueError(f"--config.dpo.sampling.top_k={config.dpo.sampling.top_k} exceeds the "
                     f"policy's vocabulary of {policy.cfg.vocab_size}")
  if "ppo" in stages:
    reward = _reward(config, policy, trained="reward" in stages)
    check_vocab(reward.cfg, tokenizer, f"reward model {reward.source}")
    _check_ppo(config, tokenizer, policy, reward)


def _check_pair_stage(config: Any, stage: str, encode, tokenizer, policy: _Model) -> None:
  """A preference stage (reward model, DPO): its lengths, and the pairs as its trainer encodes
  them fill a batch."""
  cfg = getattr(config, stage)
  _check_max_len(stage, cfg.max_len, policy)
  path = _data_path(config, "preferences")
  rows = (config.task.num_pairs if path is None else
          _encoded_rows(stage, path, lambda: encode(
              tokenizer, data_lib.load_preferences(path), cfg, config.use_chat_template), policy))
  _check_rows(stage, rows, cfg)


def _data_path(config: Any, field: str) -> str | None:
  """A stage's data file (`config.<field>`), or None for the built-in task's, which
  `tasks.prepare` writes later."""
  path = getattr(config, field)
  if path or config.task.name:   # a built-in task
    return path or None
  raise ValueError(f"--config.{field} is empty: with --config.task.name='' the stage reads "
                   "your data from it")


def _tokenizer(config: Any, workdir: str):
  """The tokenizer the stages will load; the built-in task's is built in memory when the
  workdir has none yet (`tasks.prepare` writes it)."""
  path = config.tokenizer_path
  if not path and config.task.name:   # a built-in task
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(path):
      words = (arithmetic.vocabulary(config.task.max_operand)
               if config.task.name == "arithmetic" else data_lib.vocabulary())
      with tempfile.TemporaryDirectory() as tmp:
        return data_lib.build_tokenizer(words, tmp)
  path = path or config.policy_path
  if not path:
    raise ValueError("no tokenizer: set --config.tokenizer_path or --config.policy_path")
  return data_lib.load_tokenizer(path)


def _check_chat_template(config: Any, tokenizer) -> None:
  """Every stage renders its text through the template: without one, none could."""
  if config.use_chat_template and not data_lib.has_chat_template(tokenizer):
    name = getattr(tokenizer, "name_or_path", "") or "of the built-in task"
    raise ValueError(
        f"--config.use_chat_template=True but the tokenizer {name} has no chat template (a "
        "chat_template in its tokenizer_config.json, or chat_template.jinja): give a tokenizer "
        "with one (--config.tokenizer_path), or leave --config.use_chat_template=False")


def _policy(config: Any, tokenizer) -> _Model:
  """The policy's config: --config.policy_path's, or the from-scratch `config.model`."""
  if config.policy_path:
    cfg, kind = _inspect(config, "policy_path")
    if kind != "causal_lm":
      raise ValueError(f"--config.policy_path={config.policy_path} is a reward model "
                       "(*ForSequenceClassification): the policy needs an LM head")
    return _Model(cfg, config.policy_path)
  cfg = config.model.replace(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
  try:
    models.check_exportable(cfg)
  except models.ConfigError as e:
    raise models.ConfigError(f"--config.model: {e}") from None
  return _Model(cfg, "--config.model")


def _inspect(config: Any, field: str) -> tuple[models.DecoderConfig, str]:
  try:
    return models.inspect_checkpoint(getattr(config, field))
  except models.CheckpointError as e:
    raise models.CheckpointError(f"--config.{field}: {e}") from None


def _reward(config: Any, policy: _Model, trained: bool) -> _Model:
  """The reward model PPO reads: the one the reward stage trains from the policy's trunk, or
  --config.reward_path, which must be a reward model (a causal LM there would get a fresh zero
  head: every score 0)."""
  if trained or not config.reward_path:
    return policy
  cfg, kind = _inspect(config, "reward_path")
  if kind != "scalar":
    raise ValueError(
        f"--config.reward_path={config.reward_path} is a causal LM, not a reward model (its "
        "config.json architectures are not *ForSequenceClassification); train one with "
        "experiments.reward_model, or leave reward_path empty to train it in this run")
  if cfg.num_labels != 1:
    raise ValueError(f"--config.reward_path={config.reward_path} has num_labels="
                     f"{cfg.num_labels}; a reward model has one output")
  return _Model(cfg, config.reward_path)


def _positions(model: _Model) -> str:
  where = ("--config.model.max_position_embeddings" if model.source == "--config.model"
           else f"max_position_embeddings of {os.path.join(model.source, 'config.json')}")
  return f"{model.cfg.max_position_embeddings} ({where})"


def check_vocab(model_cfg: models.DecoderConfig, tokenizer, what: str) -> None:
  """Raises unless every token of `tokenizer` has a row in the model's embedding."""
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"{what}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                     f"has {model_cfg.vocab_size}; they do not belong together")


def _check_max_len(stage: str, max_len: int, model: _Model) -> None:
  if max_len > model.cfg.max_position_embeddings:
    raise ValueError(f"--config.{stage}.max_len={max_len} exceeds the model's positions: "
                     f"{_positions(model)}")


def _encoded_rows(stage: str, path: str, encode, model: _Model) -> int:
  """Rows of a stage's data file as its trainer encodes them (parse errors name the file and
  line; an encoding error names the file, an over-long completion the stage's options too)."""
  try:
    arrays = encode()
  except data_lib.DataError as e:
    if e.path is not None:   # the loader's, naming the file and line
      raise
    hint = (f": set --config.{stage}.max_len (at most the model's positions, "
            f"{_positions(model)}) or --config.{stage}.drop_overlong=True"
            if "max_len" in str(e) else "")
    raise data_lib.DataError(f"{e}{hint}", path) from None
  supervised.check_vocab(arrays, model.cfg.vocab_size)
  return supervised.num_rows(arrays)


def _check_rows(stage: str, rows: int, cfg: supervised.TrainerConfig) -> None:
  try:
    train, _ = supervised.split_indices(rows, cfg.eval_fraction, cfg.seed)
  except ValueError as e:
    raise ValueError(f"--config.{stage}: {e}") from None
  if len(train) < cfg.batch_size:
    raise ValueError(f"--config.{stage}: {len(train)} training rows (of {rows}, after the "
                     f"eval_fraction={cfg.eval_fraction} split) are fewer than batch_size="
                     f"{cfg.batch_size}")


def _check_ppo(config: Any, tokenizer, policy: _Model, reward: _Model) -> None:
  p = config.ppo
  width = p.max_prompt_len + p.sampling.max_new_tokens
  for what, model in (("policy", policy), ("reward model", reward)):
    if width > model.cfg.max_position_embeddings:
      raise ValueError(
          f"--config.ppo.max_prompt_len + --config.ppo.sampling.max_new_tokens = "
          f"{p.max_prompt_len} + {p.sampling.max_new_tokens} exceeds the {what}'s "
          f"max_position_embeddings = {_positions(model)}")
  if p.sampling.top_k > policy.cfg.vocab_size:
    raise ValueError(f"--config.ppo.sampling.top_k={p.sampling.top_k} exceeds the policy's "
                     f"vocabulary of {policy.cfg.vocab_size} tokens")
  prompts = _data_path(config, "prompts")
  if prompts is None:
    if config.task.num_prompts < p.batch_size:
      raise ValueError(f"--config.task.num_prompts={config.task.num_prompts} prompts cannot "
                       f"fill one batch of --config.ppo.batch_size={p.batch_size}")
    return
  enc = data_lib.encode_prompts(tokenizer, data_lib.load_prompts(prompts), p.max_prompt_len,
                                config.use_chat_template)
  try:
    data_lib.PromptIterator(enc.ids, enc.mask, p.batch_size, p.seed, jax.process_index(),
                            jax.process_count())
  except ValueError as e:
    raise ValueError(f"{prompts}: {e} (--config.ppo.batch_size)") from None
  if config.eval_prompts:
    data_lib.load_prompts(config.eval_prompts)
