r"""Stage 3 alone: PPO from an SFT policy against a reward model; writes <workdir>/ppo.

  python -m experiments.ppo --workdir=DIR --config.policy_path=DIR/sft \
      --config.reward_path=DIR/reward
  python -m experiments.ppo --workdir=DIR --config.task.name='' --config.prompts=prompts.jsonl \
      --config.policy_path=SFT_CKPT --config.reward_path=RM_CKPT --config.ppo.max_steps=20000
"""

import json

from experiments import common
from rlhf_jax import pipeline, plugins, preflight

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  common.setup()
  config = plugins.build_config(pipeline.ExperimentConfig, _CONFIG.value)
  if not config.policy_path:
    raise ValueError("set --config.policy_path (a Hugging Face checkpoint; and --config."
                     "reward_path when the rewards or the critic need a reward model)")
  preflight.check_run(config, _WORKDIR.value, ("ppo",))
  paths = pipeline.Paths(_WORKDIR.value)
  final = pipeline.run_ppo(config, paths, config.policy_path, config.reward_path)
  print(json.dumps({k: v for k, v in final.items() if k != "samples"}, sort_keys=True))


if __name__ == "__main__":
  common.run(main)
