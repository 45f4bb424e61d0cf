r"""SFT -> reward model -> PPO (or SFT -> DPO, `method="dpo"`) in one command.

  python -m experiments.rlhf --workdir=runs/default
  python -m experiments.rlhf --workdir=DIR --config=experiments/configs/default.py:grpo
  python -m experiments.rlhf --workdir=DIR --config=experiments/configs/default.py:dpo   # SFT -> DPO
  python -m experiments.rlhf --workdir=DIR --config.policy_path=SFT_CKPT \
      --config.reward_path=RM_CKPT --config.prompts=prompts.jsonl --config.task.name=''
"""

import json

from experiments import common
from rlhf_jax import pipeline, plugins

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  common.setup()
  config = plugins.build_config(pipeline.ExperimentConfig, _CONFIG.value)
  final = pipeline.run_all(config, _WORKDIR.value)
  print(json.dumps({k: v for k, v in final.items() if k != "samples"}, sort_keys=True))


if __name__ == "__main__":
  common.run(main)
