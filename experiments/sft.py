r"""Stage 1 alone: supervised fine-tuning; writes <workdir>/sft (a Hugging Face checkpoint).

  python -m experiments.sft --workdir=DIR                      # built-in task, model from scratch
  python -m experiments.sft --workdir=DIR --config.task.name='' --config.sft_data=sft.jsonl \
      --config.policy_path=BASE_CKPT
"""

from experiments import common
from rlhf_jax import pipeline

_CONFIG, _WORKDIR = common.define_flags()


def main(argv):
  del argv
  config = common.stage_config(_CONFIG.value, _WORKDIR.value, "sft")
  print(pipeline.run_sft(config, pipeline.Paths(_WORKDIR.value)))


if __name__ == "__main__":
  common.run(main)
