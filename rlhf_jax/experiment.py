"""The config tree of one RLHF run: `ExperimentConfig` (data, models, every stage's dataclass),
the built-in task's `TaskConfig`, and the workdir layout `Paths`.

The command line edits its mirror ConfigDict (`--config.ppo.kl.init_coef=0.2`, see
`rlhf_jax.config_tree`); `rlhf_jax.pipeline` runs the stages it describes.
"""

import dataclasses
import os

from rlhf_jax import models
from rlhf_jax.trainers.dpo import DPOConfig
from rlhf_jax.trainers.ppo import PPOTrainerConfig
from rlhf_jax.trainers.reward import RewardConfig
from rlhf_jax.trainers.sft import SFTConfig


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The built-in task (`rlhf_jax.data.synthetic`), written into <workdir>/data.

  Attributes:
    name: "default": the built-in task; "arithmetic": sums "12 + 7 =" -> "19" with an
      exact-match reward (`data.arithmetic`, no preference data: use it with
      `ppo.rewards.terms=arithmetic`); "": your own data (the paths in `ExperimentConfig`).
    seed: Seed of the task's corpus, pairs, labels and prompts.
    num_sft: SFT demonstrations.
    num_pairs: Preference pairs.
    num_prompts: PPO training prompts (the evaluation prompts number `ppo.num_eval_prompts`).
    label_temperature: Bradley-Terry temperature of the simulated labeler's choices.
    max_operand: Operands of the "arithmetic" task are 0 .. max_operand - 1.
    sft_noise: Share of the "arithmetic" task's demonstrations whose answer is off by one.
  """
  name: str = "default"
  seed: int = 0
  num_sft: int = 6000
  num_pairs: int = 10000
  num_prompts: int = 4096
  label_temperature: float = 0.1
  max_operand: int = 20
  sft_noise: float = 0.0

  def __post_init__(self):
    if self.name not in ("default", "arithmetic", ""):
      raise ValueError(f"unknown task {self.name!r}: use 'default', 'arithmetic' or '' with "
                       "data paths")
    for name in ("seed", "num_sft", "num_pairs", "num_prompts"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not 0 < self.label_temperature < float("inf"):
      raise ValueError(f"label_temperature must be finite and > 0, got {self.label_temperature}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One RLHF run: data, models, and each stage's config.

  Attributes:
    task: The built-in task; with `task.name=""` the data paths below are yours.
    mesh_shape: Mesh over (data, fsdp, tensor); one -1 takes the remaining devices.
    prompts, eval_prompts, sft_data, preferences: Data files (JSONL / text / parquet /
      datasets-on-disk); empty: the built-in task's.
    use_chat_template: Render every stage's text through the tokenizer's chat template
      (`data.chat`): a prompt as a user turn (an HH dialogue as its turns) with the generation
      prompt, an SFT completion or a preference reply as the assistant turn the template writes
      after it, so SFT, reward, DPO and PPO see the same prompt tokens; the tokenizer must have
      a chat template, and every SFT example and pair a prompt.
    policy_path, reward_path: Local Hugging Face checkpoints; empty: the stage trains one (SFT
      from scratch with `model`, the reward model from the SFT policy's trunk).
    tokenizer_path: Default: the policy checkpoint's directory (or the built-in task's).
    gold_judge: "package.module:function", a text -> score judge the policy never sees (logged as
      gold_score, read by the reward-hacking monitor); empty: the built-in task's labeler
      (`data.gold_score`), or none on your own data, where the monitor has KL and distinct-n only.
    model: The from-scratch architecture; vocab_size and the pad / EOS ids come from the
      tokenizer. Its dtype and param_dtype also apply to loaded checkpoints.
    method: The optimisation stage after SFT: "ppo" (reward model, then PPO against it) or
      "dpo" (offline preference optimisation on the pairs, `dpo.loss.name`; no reward model).
    sft, reward, ppo, dpo: The stages (`rlhf_jax.trainers`).
    plugins: Comma-separated modules imported before the config is built, so the losses,
      estimators, critics and rewards they register can be named in it (`rlhf_jax.plugins`).
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
  method: str = "ppo"
  dpo: DPOConfig = DPOConfig()
  plugins: str = ""
  overwrite: bool = False

  def __post_init__(self):
    if self.method not in ("ppo", "dpo"):
      raise ValueError(f"unknown method {self.method!r}: use 'ppo' or 'dpo'")


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where a run's inputs and outputs live."""
  workdir: str

  def __getattr__(self, name):
    sub = {"data": "data", "tokenizer": "tokenizer", "sft": "sft", "reward": "reward",
           "ppo": "ppo", "policy": os.path.join("ppo", "policy"), "dpo": "dpo"}
    if name in sub:
      return os.path.join(self.workdir, sub[name])
    raise AttributeError(name)
