r"""The DPO stage alone: offline preference optimisation of an SFT policy; writes <workdir>/dpo.

  python -m experiments.dpo --workdir=DIR --config.policy_path=DIR/sft
  python -m experiments.dpo --workdir=DIR --config.task.name='' --config.preferences=pairs.jsonl \
      --config.policy_path=SFT_CKPT --config.dpo.loss.name=ipo --config.dpo.loss.beta=0.5

SFT -> DPO in one command: `python -m experiments.rlhf --config=experiments/configs/default.py:dpo`.
"""

from experiments import common
from rlhf_jax import pipeline

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  config = common.stage_config(
      _CONFIG.value, _WORKDIR.value, "dpo",
      "to the SFT checkpoint DPO starts from (and takes as its reference)")
  common.print_record(pipeline.run_dpo(config, pipeline.Paths(_WORKDIR.value), config.policy_path))


if __name__ == "__main__":
  common.run(main)
