r"""SFT -> reward model -> PPO (or SFT -> DPO, `method="dpo"`) in one command.

  python -m experiments.rlhf --workdir=runs/default
  python -m experiments.rlhf --workdir=DIR --config=experiments/configs/default.py:grpo
  python -m experiments.rlhf --workdir=DIR --config=experiments/configs/default.py:dpo   # SFT -> DPO
  python -m experiments.rlhf --workdir=DIR --config.policy_path=SFT_CKPT \
      --config.reward_path=RM_CKPT --config.prompts=prompts.jsonl --config.task.name=''
"""

from experiments import common
from rlhf_jax import pipeline

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  config = common.stage_config(_CONFIG.value, _WORKDIR.value, None)
  common.print_record(pipeline.run_all(config, _WORKDIR.value))


if __name__ == "__main__":
  common.run(main)
