"""The built-in tasks (`config.task.name`: "default", the sentiment task of `data.synthetic`;
"arithmetic", `data.arithmetic`) as files in the workdir, and the gold judge of a run.

The pipeline writes a built-in task to JSONL and reads it back through the same loaders as
users' data, so the default run exercises the path every run takes.
"""

import dataclasses
import os
import tempfile

import jax

from rlhf_jax import data as data_lib
from rlhf_jax import evaluation, fileio
from rlhf_jax.data import arithmetic
from rlhf_jax.experiment import ExperimentConfig, Paths


def materialize(config: ExperimentConfig, paths: Paths) -> tuple[ExperimentConfig, dict]:
  """The config pointed at the built-in task's data files in the workdir, and those files'
  contents {path: bytes}, not yet written: a run refused for a changed setting leaves the workdir
  as it was. The tokenizer (the same for every task seed) is built when missing."""
  t = config.task
  if t.name == "default":
    task = data_lib.make_default_task(
        seed=t.seed, n_sft=max(t.num_sft, 1), n_pairs=t.num_pairs, n_prompts=t.num_prompts,
        n_eval_prompts=config.ppo.num_eval_prompts, label_temperature=t.label_temperature)
    words = data_lib.vocabulary()
  elif t.name == "arithmetic":
    task = arithmetic.make_arithmetic_task(
        seed=t.seed, n_sft=max(t.num_sft, 1), n_prompts=t.num_prompts,
        n_eval_prompts=config.ppo.num_eval_prompts, max_operand=t.max_operand,
        sft_noise=t.sft_noise)
    words = arithmetic.vocabulary(t.max_operand)
  else:
    return config, {}
  contents = {}
  with tempfile.TemporaryDirectory() as tmp:
    for f in data_lib.write_default_task(task, tmp):
      with open(f, "rb") as fh:
        contents[os.path.join(paths.data, os.path.basename(f))] = fh.read()
  files = data_lib.DefaultTaskFiles(*contents)
  if jax.process_index() == 0 and not os.path.isdir(paths.tokenizer):
    data_lib.build_tokenizer(words, paths.tokenizer)
  return dataclasses.replace(
      config, sft_data=config.sft_data or files.sft,
      preferences=config.preferences or files.preferences,
      prompts=config.prompts or files.train_prompts,
      eval_prompts=config.eval_prompts or files.eval_prompts,
      tokenizer_path=config.tokenizer_path or paths.tokenizer), contents


def write(contents: dict[str, bytes]) -> None:
  """Writes the files whose content differs from what is on disk (a rerun touches none)."""
  if jax.process_index() != 0:
    return
  for path, data in contents.items():
    if fileio.content_hash(path) != fileio.bytes_hash(data):
      fileio.write_atomic(path, data)


def prepare(config: ExperimentConfig, paths: Paths) -> ExperimentConfig:
  """Writes the built-in task's data files and tokenizer into the workdir; returns the config
  pointed at them, so the default run reads data through the same loaders as users' files."""
  config, contents = materialize(config, paths)
  write(contents)
  return config


def gold_fn(config: ExperimentConfig):
  """The judge the policy never sees: `config.gold_judge`, the built-in task's labeler, or None."""
  return (evaluation.load_gold_judge(config.gold_judge) if config.gold_judge
          else data_lib.gold_score if config.task.name == "default" else None)
