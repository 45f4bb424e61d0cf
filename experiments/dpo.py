r"""The DPO stage alone: offline preference optimisation of an SFT policy; writes <workdir>/dpo.

  python -m experiments.dpo --workdir=DIR --config.policy_path=DIR/sft
  python -m experiments.dpo --workdir=DIR --config.task.name='' --config.preferences=pairs.jsonl \
      --config.policy_path=SFT_CKPT --config.dpo.loss.name=ipo --config.dpo.loss.beta=0.5

SFT -> DPO in one command: `python -m experiments.rlhf --config=experiments/configs/default.py:dpo`.
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
    raise ValueError("set --config.policy_path to the SFT checkpoint DPO starts from (and "
                     "takes as its reference)")
  preflight.check_run(config, _WORKDIR.value, ("dpo",))
  paths = pipeline.Paths(_WORKDIR.value)
  final = pipeline.run_dpo(config, paths, config.policy_path)
  print(json.dumps({k: v for k, v in final.items() if k != "samples"}, sort_keys=True))


if __name__ == "__main__":
  common.run(main)
