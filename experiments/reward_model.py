r"""Stage 2 alone: Bradley-Terry reward model; writes <workdir>/reward.

  python -m experiments.reward_model --workdir=DIR --config.policy_path=DIR/sft
  python -m experiments.reward_model --workdir=DIR --config.task.name='' \
      --config.preferences=pairs.jsonl --config.policy_path=SFT_CKPT
"""

from experiments import common
from rlhf_jax import pipeline

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  config = common.stage_config(_CONFIG.value, _WORKDIR.value, "reward",
                               "to the SFT checkpoint the reward model starts from")
  print(pipeline.run_reward(config, pipeline.Paths(_WORKDIR.value), config.policy_path))


if __name__ == "__main__":
  common.run(main)
