r"""Stage 3 alone: PPO from an SFT policy against a reward model; writes <workdir>/ppo.

  python -m experiments.ppo --workdir=DIR --config.policy_path=DIR/sft \
      --config.reward_path=DIR/reward
  python -m experiments.ppo --workdir=DIR --config.task.name='' --config.prompts=prompts.jsonl \
      --config.policy_path=SFT_CKPT --config.reward_path=RM_CKPT --config.ppo.max_steps=20000
"""

from experiments import common
from rlhf_jax import pipeline

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  config = common.stage_config(
      _CONFIG.value, _WORKDIR.value, "ppo", "(a Hugging Face checkpoint; and --config.reward_path "
      "when the rewards or the critic need a reward model)")
  common.print_record(pipeline.run_ppo(config, pipeline.Paths(_WORKDIR.value), config.policy_path,
                                       config.reward_path))


if __name__ == "__main__":
  common.run(main)
