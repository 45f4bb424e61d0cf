"""What every experiment main shares: the default config path, JAX setup, and one clear error."""

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from rlhf_jax import faults

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")


def setup() -> None:
  jax.config.update("jax_threefry_partitionable", True)
  logging.set_verbosity(logging.INFO)


def guard(main):
  """Bad input (ValueError, FileNotFoundError, ...) ends the run with one line naming the
  problem and exit status 2, instead of a traceback. Preemption (SIGTERM / SIGINT, after the
  final checkpoint) exits with 128 + the signal number (143 / 130): rerun to resume."""
  def wrapped(argv):
    try:
      return main(argv)
    except faults.Preempted as e:
      print(e, file=sys.stderr)
      sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as e:
      if os.environ.get("RLHF_JAX_TRACEBACK"):
        raise
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped


def define_flags():
  """--config (file[:variant], with --config.x=y overrides) and --workdir."""
  config = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Run configuration (file[:variant]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (data, checkpoints, metrics).",
                                required=True)
  return config, workdir
