"""What every experiment main shares: the default config path, JAX setup, the run's config checked
before anything trains, and one clear error."""

import json
import os
import re
import sys

import jax
from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from rlhf_jax import faults, pipeline, plugins, preflight

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID).")


def distributed_args(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, environ=os.environ) -> dict | None:
  """Arguments of `jax.distributed.initialize`, from the flags or else the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); None for a single process."""
  def pick(value, var, cast):
    if value is not None:
      return value
    raw = environ.get(var)
    if raw in (None, ""):
      return None
    try:
      return cast(raw)
    except ValueError:
      raise ValueError(f"${var}={raw!r} is not a valid {cast.__name__}") from None
  args = {"coordinator_address": pick(coordinator_address, "JAX_COORDINATOR_ADDRESS", str),
          "num_processes": pick(num_processes, "JAX_NUM_PROCESSES", int),
          "process_id": pick(process_id, "JAX_PROCESS_ID", int)}
  given = [k for k, v in args.items() if v is not None]
  if not given or args["num_processes"] == 1:
    return None
  if len(given) < 3:
    missing = ", ".join(f"--{k}" for k in args if args[k] is None)
    raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and "
                     f"--process_id (or the JAX_* variables); missing {missing}")
  if args["num_processes"] < 1 or not 0 <= args["process_id"] < args["num_processes"]:
    raise ValueError(f"need 0 <= process_id < num_processes, got process_id="
                     f"{args['process_id']}, num_processes={args['num_processes']}")
  return args


def setup() -> None:
  """JAX settings every main shares, and `jax.distributed.initialize` for multi-process runs."""
  jax.config.update("jax_threefry_partitionable", True)
  logging.set_verbosity(logging.INFO)
  args = distributed_args(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if args is not None:
    # Cross-process collectives on the CPU backend (ignored by GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


# Exit status of bad input or a bad environment (a wrong value, a missing or unreadable file, a
# gold judge that does not import, a full disk); any other exception is a failure of the run.
BAD_INPUT_STATUS = 2
FAILURE_STATUS = 1
_BAD_INPUT = (ValueError, KeyError, OSError, FloatingPointError, ImportError)


def error_line(e: BaseException) -> str:
  """`error: <type>: <message>` on one line (a multi-line message is joined)."""
  message = " ".join(str(e).split()) or "(no message)"
  return f"error: {type(e).__name__}: {message}"


def guard(main):
  """Every failure ends the run with one `error:` line and a non-zero exit instead of a
  traceback (set RLHF_JAX_TRACEBACK=1 for it): status 2 for bad input (ValueError, missing or
  unreadable files, ...), 1 for any other exception, 130 for Ctrl-C outside a stage that checkpoints
  on it. Preemption (SIGTERM / SIGINT, after the final checkpoint) exits with 128 + the signal
  number (143 / 130): rerun to resume."""
  def wrapped(argv):
    try:
      return main(argv)
    except faults.Preempted as e:
      print(e, file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      if os.environ.get("RLHF_JAX_TRACEBACK"):
        raise
      print("error: interrupted (KeyboardInterrupt)", file=sys.stderr)
      sys.exit(130)
    except Exception as e:   # pylint: disable=broad-except
      if os.environ.get("RLHF_JAX_TRACEBACK"):
        raise
      bad_input = isinstance(e, _BAD_INPUT)
      hint = "" if bad_input else " (RLHF_JAX_TRACEBACK=1 shows the traceback)"
      print(error_line(e) + hint, file=sys.stderr)
      sys.exit(BAD_INPUT_STATUS if bad_input else FAILURE_STATUS)
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag or config (unknown key at any depth, bad value, a config
  file that raises) ends the run like bad input: one `error:` line, exit status 2. Without
  --config the default config file is read (here, not at import, so its errors are caught too)."""
  if not any(re.match(r"--?config(=|$)", a) for a in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # ml_collections embeds the config file's traceback; its last line names the problem.
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    detail = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  except (KeyError, AttributeError) as e:   # ml_collections: an override of a missing field
    detail = f"unknown config field {_unknown_override(e, argv)}"
  print(f"error: {detail} (see --helpfull)", file=sys.stderr)
  sys.exit(2)


def _unknown_override(error: Exception, argv: list[str]) -> str:
  """The --config.a.b override naming the missing field ml_collections' error is about."""
  while error.args and isinstance(error.args[0], Exception):   # AttributeError(KeyError(...))
    error = error.args[0]
  message = str(error.args[0]) if error.args else str(error)
  field = message.splitlines()[0].strip("'\"")   # the KeyError may add "Did you mean ...?"
  for arg in argv[1:]:
    name = arg.split("=")[0].lstrip("-")
    if name.startswith("noconfig."):   # --noconfig.flag sets a bool to False
      name = name[2:]
    parts = name.split(".")
    if parts[0] == "config" and field in parts[1:]:
      return "--" + ".".join(parts)
  return repr(field)


def run(main) -> None:
  """`app.run` with `parse_flags` and `guard`: the entry point of every experiment main."""
  app.run(guard(main), flags_parser=parse_flags)


def define_flags():
  """--config (file[:variant], with --config.a.b=c overrides at any depth) and --workdir."""
  # No default here: config_flags would load it at import, outside `parse_flags`, which fills
  # it in instead.
  config = config_flags.DEFINE_config_file(
      "config", None, f"Run configuration (file[:variant]; default {DEFAULT_CONFIG}).",
      lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (data, checkpoints, metrics).",
                                required=True)
  return config, workdir


def stage_config(config: ml_collections.ConfigDict, workdir: str, stage: str | None,
                 policy_for: str = "") -> pipeline.ExperimentConfig:
  """The run's `ExperimentConfig` from --config, after `setup`, with the plugins it names
  imported first (`plugins.build_config`).

  Args:
    config, workdir: The values of the --config and --workdir flags.
    stage: The stage this main runs alone: its inputs are checked here, before anything trains
      or writes (`preflight.check_run`); None for `pipeline.run_all`, which checks its stages.
    policy_for: What the stage needs --config.policy_path for; non-empty: an unset
      policy_path raises a ValueError that says so.
  """
  setup()
  cfg = plugins.build_config(pipeline.ExperimentConfig, config)
  if policy_for and not cfg.policy_path:
    raise ValueError(f"set --config.policy_path {policy_for}")
  if stage is not None:
    preflight.check_run(cfg, workdir, (stage,))
  return cfg


def print_record(record: dict) -> None:
  """A stage's final record on stdout as one JSON line, without its sample rows."""
  print(json.dumps({k: v for k, v in record.items() if k != "samples"}, sort_keys=True))
