r"""Stage 2 alone: Bradley-Terry reward model; writes <workdir>/reward.

  python -m experiments.reward_model --workdir=DIR --config.policy_path=DIR/sft
  python -m experiments.reward_model --workdir=DIR --config.task.name='' \
      --config.preferences=pairs.jsonl --config.policy_path=SFT_CKPT
"""

from experiments import common
from rlhf_jax import pipeline, plugins, preflight

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  common.setup()
  config = plugins.build_config(pipeline.ExperimentConfig, _CONFIG.value)
  if not config.policy_path:
    raise ValueError("set --config.policy_path to the SFT checkpoint the reward model starts from")
  preflight.check_run(config, _WORKDIR.value, ("reward",))
  paths = pipeline.Paths(_WORKDIR.value)
  print(pipeline.run_reward(config, paths, config.policy_path))


if __name__ == "__main__":
  common.run(main)
