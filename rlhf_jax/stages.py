"""Stage records: whether a rerun in a used workdir skips, resumes or refuses a stage.

Each stage directory (sft/, reward/, ppo/) holds `stage.json`, written when the stage starts and
again when its exports are on disk:

  {"stage": "sft", "complete": true, "fingerprint": {...}, "budget": {...}}

The fingerprint is a flat {name: value} of everything the stage's result depends on: its config
fields (less the cadences a resumed run may change), the model settings it uses, and the content
hash of each input (data files, tokenizer, the checkpoints it starts from or trains against), so
a changed upstream stage changes every stage after it. The budget holds the fields that may grow
between runs (PPO's `max_steps`): a complete stage with another budget resumes.

`check` decides before anything is written: "done" (complete, same fingerprint and budget: skip),
"resume" (same fingerprint: continue from its checkpoints), "new" (nothing there, or a start that
saved no work yet); a different fingerprint where work would be lost raises StageMismatchError.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from rlhf_jax import fileio

RECORD = "stage.json"
OVERWRITE_HINT = ("rerun with --config.overwrite=True to start it (and the stages after it) "
                  "over, or use another workdir")


class StageMismatchError(ValueError):
  """A stage directory holds work of a run with other settings or inputs."""


def read_record(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _has_work(directory: str) -> bool:
  """Whether the directory holds trained weights: an export or a checkpoint step."""
  ckpt = os.path.join(directory, "checkpoints")
  return (os.path.exists(os.path.join(directory, "config.json"))
          or os.path.isdir(os.path.join(directory, "policy"))
          or (os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))))


def _normalized(d: dict[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(d, sort_keys=True, default=repr))


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(saved.keys() | current.keys())
  return [f"{k} was {saved.get(k, '<unset>')!r}, now {current.get(k, '<unset>')!r}"
          for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]


def check(name: str, directory: str, fingerprint: Callable[[], dict[str, Any]],
          budget: dict[str, Any]) -> str:
  """"done", "resume" or "new" for stage `name` in `directory` (see the module docstring);
  `fingerprint()` (it hashes the inputs) is called only when there is a record to compare.

  Raises StageMismatchError, naming the differing fields, when the directory holds trained
  weights of another fingerprint, or weights without a record (another tool or version).
  """
  record = read_record(directory)
  if record is None:
    if _has_work(directory):
      raise StageMismatchError(f"{directory} holds trained weights but no {RECORD} (another "
                               f"run's or an older version's): its {name} stage does not match "
                               f"this run; {OVERWRITE_HINT}")
    return "new"
  problems = differences(record.get("fingerprint", {}), _normalized(fingerprint()))
  if problems:
    if not (record.get("complete") or _has_work(directory)):
      return "new"   # a start that failed before saving anything: nothing to lose
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    done = "trained" if record.get("complete") else "partly trained"
    raise StageMismatchError(f"the {name} stage in {directory} was {done} with other settings "
                             f"or inputs: {'; '.join(problems[:3])}{more}; {OVERWRITE_HINT}")
  if record.get("complete") and record.get("budget", {}) == _normalized(budget):
    return "done"
  return "resume"


def write_record(name: str, directory: str, fingerprint: dict[str, Any], budget: dict[str, Any],
                 complete: bool) -> None:
  if jax.process_index() == 0:
    fileio.write_atomic(os.path.join(directory, RECORD), json.dumps(
        {"stage": name, "complete": complete, "fingerprint": _normalized(fingerprint),
         "budget": _normalized(budget)}, indent=1, sort_keys=True) + "\n")


def _discard_record(directory: str) -> None:
  if jax.process_index() == 0:
    os.remove(os.path.join(directory, RECORD))
    if not os.listdir(directory):
      os.rmdir(directory)


def reset(directory: str) -> None:
  """Removes what a stage keeps between runs (record, checkpoints, metrics, TensorBoard logs) so
  it starts over; its exports are replaced when it finishes, anything else stays."""
  if jax.process_index() != 0:
    return
  for name in (RECORD, "checkpoints", "metrics.jsonl", "tb"):
    path = os.path.join(directory, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run: where it lives, what its result depends on, how to train it (and
  export its result), and how to read back the result of a finished one."""
  name: str
  directory: str
  fingerprint: Callable[[], dict[str, Any]]   # lazy: an earlier stage may write its inputs
  budget: dict[str, Any]
  train: Callable[[], Any]
  result: Callable[[], Any]


def run(stages: list[Stage], overwrite: bool, before: Callable[[], None] = lambda: None
        ) -> list[Any]:
  """Runs `stages` in order and returns their results.

  Every stage is checked against its directory first, so a mismatch raises StageMismatchError
  with nothing written (`before()`, which writes the run's inputs, has not run yet); with
  `overwrite` each is reset instead. Then finished stages are skipped and the others trained,
  each re-checked first (the stages before it have now written its inputs) and recorded as
  started, then as complete once its exports are on disk.
  """
  for stage in stages:
    if overwrite:
      reset(stage.directory)
    else:
      check(stage.name, stage.directory, stage.fingerprint, stage.budget)
  before()
  results = []
  for stage in stages:
    fingerprint = stage.fingerprint()
    status = "new" if overwrite else check(stage.name, stage.directory, lambda: fingerprint,
                                           stage.budget)
    if status == "done":
      logging.info("%s: finished in %s with the same settings and inputs; skipping it",
                   stage.name, stage.directory)
      results.append(stage.result())
      continue
    write_record(stage.name, stage.directory, fingerprint, stage.budget, complete=False)
    try:
      results.append(stage.train())
    except Exception:
      if not _has_work(stage.directory):   # a start that failed leaves no record behind
        _discard_record(stage.directory)
      raise
    write_record(stage.name, stage.directory, fingerprint, stage.budget, complete=True)
  return results
