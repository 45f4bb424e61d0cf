"""Loading prompt, SFT and preference datasets from files.

Formats, detected by `detect_format`:
  - "jsonl": one JSON object per line (`.jsonl`, or `.json` not starting with `[`).
  - "json_array": a `.json` file holding one JSON array of objects.
  - "text": one prompt per non-empty line (`.txt`); prompts only.
  - "parquet": an Apache Parquet file (`.parquet`, or any file starting with `PAR1`).
  - "hf_disk": a directory written by `datasets.Dataset.save_to_disk` (it holds
    `state.json` and `dataset_info.json`) or `DatasetDict.save_to_disk` (it
    holds `dataset_dict.json`; pick the split with `split`).
A file with another extension is read as JSONL if its first non-empty line is a
JSON object, else as text.

`pyarrow` and `datasets` are imported only when a parquet file or a `datasets`
directory is read, so the rest of the package does not need them.

Every problem raises `DataError` naming the file and the line (or row).
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from rlhf_jax.data.errors import DataError

# Anthropic HH-RLHF dialogues: "\n\nHuman: ...\n\nAssistant: ..." (Bai et al. 2022).
HH_ASSISTANT_MARKER = "\n\nAssistant:"

_Record = tuple[str, Mapping[str, Any]]  # (location such as "line 3", record)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """One human comparison: `chosen` was preferred to `rejected` as a reply to `prompt`.

  `chosen` and `rejected` are completions only (they do not repeat the prompt).
  """
  prompt: str
  chosen: str
  rejected: str


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """One demonstration for supervised fine-tuning: `completion` follows `prompt`."""
  prompt: str
  completion: str


def detect_format(path: str) -> str:
  """Returns "jsonl", "json_array", "text", "parquet" or "hf_disk" for `path`.

  Raises:
    DataError: the path does not exist, or is a directory that `save_to_disk`
      did not write.
  """
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json"))
        and os.path.isfile(os.path.join(path, "dataset_info.json"))):
      return "hf_disk"
    raise DataError(
        "directory is not a Hugging Face `datasets` save_to_disk directory "
        "(it has neither dataset_dict.json nor state.json + dataset_info.json)", path)
  if not os.path.exists(path):
    raise DataError("no such file or directory", path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".parquet":
    return "parquet"
  if ext == ".jsonl":
    return "jsonl"
  if ext == ".txt":
    return "text"
  with open(path, "rb") as f:
    head = f.read(4096)
  if head.startswith(b"PAR1"):
    return "parquet"
  stripped = head.lstrip()
  if ext == ".json":
    return "json_array" if stripped.startswith(b"[") else "jsonl"
  return "jsonl" if stripped.startswith(b"{") else "text"


def _decoded_lines(path: str) -> Iterable[tuple[int, str]]:
  """Yields (1-based line number, line without its newline), decoding UTF-8 per line."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        yield lineno, raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason})", path, f"line {lineno}") from None


def _read_jsonl(path: str) -> list[_Record]:
  records = []
  for lineno, line in _decoded_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, f"line {lineno}") from None
    if not isinstance(record, dict):
      raise DataError(f"expected a JSON object, got {_type_name(record)}", path, f"line {lineno}")
    records.append((f"line {lineno}", record))
  return records


def _read_json_array(path: str) -> list[_Record]:
  try:
    with open(path, encoding="utf-8") as f:
      items = json.load(f)
  except UnicodeDecodeError as e:
    raise DataError(f"not valid UTF-8 ({e.reason})", path) from None
  except json.JSONDecodeError as e:
    raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, f"line {e.lineno}") from None
  if not isinstance(items, list):
    raise DataError(f"expected a JSON array of objects, got {_type_name(items)}", path)
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise DataError(f"expected a JSON object, got {_type_name(item)}", path, f"item {i}")
  return [(f"item {i}", item) for i, item in enumerate(items)]


def _read_parquet(path: str) -> list[_Record]:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  try:
    rows = pyarrow.parquet.read_table(path).to_pylist()
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(f"cannot read parquet: {e}", path) from None
  return [(f"row {i}", row) for i, row in enumerate(rows)]


def _read_hf_disk(path: str, split: str) -> list[_Record]:
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    loaded = datasets.load_from_disk(path)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot load `datasets` directory: {e}", path) from None
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise DataError(f"no split {split!r}; splits are {sorted(loaded)}", path)
    loaded = loaded[split]
  return [(f"row {i}", row) for i, row in enumerate(loaded.to_list())]


def _read_records(path: str, fmt: str, split: str) -> list[_Record]:
  """Reads a structured (field-bearing) file as (location, record) pairs."""
  if fmt == "jsonl":
    return _read_jsonl(path)
  if fmt == "json_array":
    return _read_json_array(path)
  if fmt == "parquet":
    return _read_parquet(path)
  if fmt == "hf_disk":
    return _read_hf_disk(path, split)
  raise DataError(
      "plain text has no fields; use JSONL, JSON, parquet or a `datasets` directory", path)


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _get_str(record: Mapping[str, Any], field: str, path: str, location: str) -> str:
  if field not in record:
    raise DataError(f"missing field {field!r} (fields: {sorted(record)})", path, location)
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f"field {field!r} must be a string, got {_type_name(value)}", path, location)
  return value


def _non_empty(items: list[Any], path: str, what: str) -> list[Any]:
  if not items:
    raise DataError(f"dataset is empty (no {what})", path)
  return items


def load_prompts(path: str, field: str = "prompt", split: str = "train") -> list[str]:
  """Loads prompts from JSONL/JSON, text, parquet or a `datasets` directory.

  Args:
    path: file or `save_to_disk` directory; see `detect_format`.
    field: the field (column) holding the prompt; unused for text files, where
      each non-empty line is one prompt (its newline removed, nothing else).
    split: the split of a `DatasetDict` directory.

  Returns:
    The prompts in file order.

  Raises:
    DataError: missing file, no prompts, bad JSON, missing or non-string field,
      or a blank prompt (generation needs at least one prompt token).
  """
  fmt = detect_format(path)
  if fmt == "text":
    return _non_empty(
        [line for _, line in _decoded_lines(path) if line.strip()], path, "prompts")
  prompts = []
  for location, record in _read_records(path, fmt, split):
    prompt = _get_str(record, field, path, location)
    if not prompt.strip():
      raise DataError(f"field {field!r} is blank", path, location)
    prompts.append(prompt)
  return _non_empty(prompts, path, "prompts")


def load_sft(path: str, prompt_field: str = "prompt", completion_field: str = "completion",
             split: str = "train") -> list[SFTExample]:
  """Loads (prompt, completion) demonstrations from JSONL/JSON, parquet or a `datasets` directory.

  The prompt may be empty; the completion may not (it would carry no SFT loss
  beyond an EOS, which almost always means a broken export).

  Raises:
    DataError: as `load_prompts`, or a blank completion.
  """
  fmt = detect_format(path)
  examples = []
  for location, record in _read_records(path, fmt, split):
    prompt = _get_str(record, prompt_field, path, location)
    completion = _get_str(record, completion_field, path, location)
    if not completion.strip():
      raise DataError(f"field {completion_field!r} is blank", path, location)
    examples.append(SFTExample(prompt, completion))
  return _non_empty(examples, path, "examples")


def split_hh_prefix(chosen: str, rejected: str) -> PreferencePair:
  """Splits two full dialogues into a shared prompt and the two replies.

  Anthropic HH-RLHF (Bai et al. 2022, "Training a Helpful and Harmless
  Assistant with RLHF") stores each side as the whole dialogue
  "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is the longest common prefix
  of the two strings cut just after its last "\\n\\nAssistant:"; the replies are
  the remainders (they keep their leading space). Without that marker in the
  common prefix the prompt is "" and both strings are returned unchanged.
  """
  common = os.path.commonprefix([chosen, rejected])
  marker = common.rfind(HH_ASSISTANT_MARKER)
  if marker < 0:
    return PreferencePair("", chosen, rejected)
  cut = marker + len(HH_ASSISTANT_MARKER)
  return PreferencePair(chosen[:cut], chosen[cut:], rejected[cut:])


def load_preferences(path: str, split: str = "train", prompt_field: str = "prompt",
                     chosen_field: str = "chosen",
                     rejected_field: str = "rejected") -> list[PreferencePair]:
  """Loads preference pairs from JSONL/JSON, parquet or a `datasets` directory.

  With a `prompt` field, `chosen`/`rejected` are taken as completions. Without
  one, they are full texts and are split by `split_hh_prefix` (HH format), or
  kept whole with prompt "" when they share no "\\n\\nAssistant:" prefix.

  Raises:
    DataError: as `load_prompts`, or a pair whose chosen equals its rejected
      (it carries no preference and makes the Bradley-Terry loss constant).
  """
  fmt = detect_format(path)
  pairs = []
  for location, record in _read_records(path, fmt, split):
    chosen = _get_str(record, chosen_field, path, location)
    rejected = _get_str(record, rejected_field, path, location)
    if chosen == rejected:
      raise DataError(f"fields {chosen_field!r} and {rejected_field!r} are identical",
                      path, location)
    if prompt_field in record:
      pairs.append(PreferencePair(_get_str(record, prompt_field, path, location), chosen,
                                  rejected))
    else:
      pairs.append(split_hh_prefix(chosen, rejected))
  return _non_empty(pairs, path, "preference pairs")


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> str:
  """Writes one JSON object per line (UTF-8) and returns `path`.

  The file is written beside its destination and renamed into place, so a
  reader never sees half a file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path
