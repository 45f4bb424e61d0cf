"""`python tests/kill_at_step.py experiments.MAIN FLAGS...` runs that experiment main, killing
itself with SIGKILL (no cleanup, no final checkpoint) right after stage $KILL_STAGE (sft, reward,
ppo) writes its metrics record of step $KILL_STEP; a plain run without those variables. For the
kill -9 tests (tests/stage_kill_test.py)."""

import os
import signal

from rlhf_jax import metrics

_STAGE, _STEP = os.environ.get("KILL_STAGE"), int(os.environ.get("KILL_STEP", "0"))
_write = metrics.MetricsWriter.write


def _write_then_die(self, step, record):
  out = _write(self, step, record)
  if os.path.basename(os.path.dirname(self.path)) == _STAGE and step == _STEP:
    os.kill(os.getpid(), signal.SIGKILL)
  return out


metrics.MetricsWriter.write = _write_then_die

if __name__ == "__main__":
  import importlib
  import sys
  from experiments import common
  main = importlib.import_module(sys.argv.pop(1)).main
  common.run(main)
