"""Tests for rlhf_jax.data.loaders: formats, auto-detection, HH splitting and errors."""

import json
import os

import pytest

from rlhf_jax import data


def _write(path, text, mode="w"):
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def _jsonl(path, records):
  return _write(path, "".join(json.dumps(r) + "\n" for r in records))


def _parquet(path, columns):
  import pyarrow
  import pyarrow.parquet
  pyarrow.parquet.write_table(pyarrow.table(columns), str(path))
  return str(path)


def _hf_dir(path, columns, splits=None):
  import datasets
  ds = datasets.Dataset.from_dict(columns)
  (datasets.DatasetDict({s: ds for s in splits}) if splits else ds).save_to_disk(str(path))
  return str(path)


PROMPTS = ["hello there", "write a poem", "  leading spaces kept"]


class TestPrompts:

  def test_jsonl(self, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    assert data.load_prompts(path) == PROMPTS

  def test_jsonl_skips_blank_lines_and_custom_field(self, tmp_path):
    path = _write(tmp_path / "p.json", '{"q": "a"}\n\n   \n{"q": "b"}\n')
    assert data.detect_format(path) == "jsonl"
    assert data.load_prompts(path, field="q") == ["a", "b"]

  def test_json_array(self, tmp_path):
    path = _write(tmp_path / "p.json", json.dumps([{"prompt": p} for p in PROMPTS], indent=1))
    assert data.detect_format(path) == "json_array"
    assert data.load_prompts(path) == PROMPTS

  def test_text(self, tmp_path):
    path = _write(tmp_path / "p.txt", "hello there\n\nwrite a poem\r\n  \n  leading spaces kept")
    assert data.load_prompts(path) == PROMPTS

  def test_parquet(self, tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"prompt": PROMPTS, "n": [1, 2, 3]})
    assert data.load_prompts(path) == PROMPTS

  def test_hf_dataset_dir(self, tmp_path):
    path = _hf_dir(tmp_path / "ds", {"prompt": PROMPTS})
    assert data.detect_format(path) == "hf_disk"
    assert data.load_prompts(path) == PROMPTS

  def test_hf_dataset_dict_split(self, tmp_path):
    path = _hf_dir(tmp_path / "dd", {"prompt": PROMPTS}, splits=["train", "test"])
    assert data.load_prompts(path, split="test") == PROMPTS
    with pytest.raises(data.DataError,
                       match=r"dd: no split 'valid'; splits are \['test', 'train'\]"):
      data.load_prompts(path, split="valid")

  @pytest.mark.parametrize("kind", ["jsonl", "text", "parquet"])
  def test_detect_by_contents(self, tmp_path, kind):
    path = str(tmp_path / "prompts.data")
    if kind == "jsonl":
      _jsonl(path, [{"prompt": p} for p in PROMPTS])
    elif kind == "text":
      _write(path, "\n".join(PROMPTS))
    else:
      _parquet(path, {"prompt": PROMPTS})
    assert data.detect_format(path) == kind
    assert data.load_prompts(path) == PROMPTS


class TestErrors:

  def test_missing_file(self, tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(data.DataError, match="nope.jsonl: no such file") as e:
      data.load_prompts(path)
    assert e.value.path == path
    assert isinstance(e.value, ValueError)

  @pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.txt", "\n  \n"), ("e.json", "[]")])
  def test_empty(self, tmp_path, name, text):
    with pytest.raises(data.DataError, match=rf"{name}: dataset is empty"):
      data.load_prompts(_write(tmp_path / name, text))

  def test_bad_json_line(self, tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl, line 3: invalid JSON") as e:
      data.load_prompts(path)
    assert e.value.location == "line 3"

  def test_not_an_object(self, tmp_path):
    path = _write(tmp_path / "arr.jsonl", '{"prompt": "a"}\n["b"]\n')
    with pytest.raises(data.DataError,
                       match=r"arr.jsonl, line 2: expected a JSON object, got list"):
      data.load_prompts(path)

  def test_bad_utf8(self, tmp_path):
    path = _write(tmp_path / "u.txt", b"ok\n\xff\xfe bad\n", mode="wb")
    with pytest.raises(data.DataError, match=r"u.txt, line 2: not valid UTF-8"):
      data.load_prompts(path)

  def test_missing_field(self, tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(data.DataError,
                       match=r"m.jsonl, line 2: missing field 'prompt' \(fields: \['text'\]\)"):
      data.load_prompts(path)

  def test_wrong_type(self, tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": 7}])
    with pytest.raises(data.DataError,
                       match=r"t.jsonl, line 3: field 'prompt' must be a string, got int"):
      data.load_prompts(path)

  def test_blank_prompt(self, tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"prompt": "  "}])
    with pytest.raises(data.DataError, match=r"b.jsonl, line 1: field 'prompt' is blank"):
      data.load_prompts(path)

  def test_parquet_row(self, tmp_path):
    path = _parquet(tmp_path / "n.parquet", {"prompt": ["a", None]})
    with pytest.raises(data.DataError,
                       match=r"n.parquet, row 1: field 'prompt' must be a string, got null"):
      data.load_prompts(path)

  def test_corrupt_parquet(self, tmp_path):
    path = _write(tmp_path / "c.parquet", "not parquet at all")
    with pytest.raises(data.DataError, match=r"c.parquet: cannot read parquet"):
      data.load_prompts(path)

  def test_plain_directory(self, tmp_path):
    with pytest.raises(data.DataError,
                       match="not a Hugging Face `datasets` save_to_disk directory"):
      data.load_prompts(str(tmp_path))

  def test_text_has_no_fields(self, tmp_path):
    path = _write(tmp_path / "p.txt", "a\n")
    with pytest.raises(data.DataError, match=r"p.txt: plain text has no fields"):
      data.load_preferences(path)


class TestPreferences:

  def test_with_prompt(self, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": " yes", "rejected": " no"}])
    assert data.load_preferences(path) == [data.PreferencePair("q", " yes", " no")]

  def test_hh_split(self, tmp_path):
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    records = [
        {"chosen": history + " a good joke", "rejected": history + " no"},
        # Replies sharing their first words: the prompt still ends at the marker.
        {"chosen": "\n\nHuman: q\n\nAssistant: sure, here",
         "rejected": "\n\nHuman: q\n\nAssistant: sure"},
        # Divergence inside an earlier turn: the prompt stops at the last shared marker.
        {"chosen": "\n\nHuman: q\n\nAssistant: A\n\nHuman: x\n\nAssistant: B",
         "rejected": "\n\nHuman: q\n\nAssistant: C"},
        # No HH marker: whole strings, empty prompt.
        {"chosen": "tl;dr: good", "rejected": "tl;dr: bad"},
    ]
    expected = [
        data.PreferencePair(history, " a good joke", " no"),
        data.PreferencePair("\n\nHuman: q\n\nAssistant:", " sure, here", " sure"),
        data.PreferencePair("\n\nHuman: q\n\nAssistant:", " A\n\nHuman: x\n\nAssistant: B", " C"),
        data.PreferencePair("", "tl;dr: good", "tl;dr: bad"),
    ]
    assert data.load_preferences(_jsonl(tmp_path / "hh.jsonl", records)) == expected
    for pair, record in zip(expected, records):
      assert pair.prompt + pair.chosen == record["chosen"]
      assert pair.prompt + pair.rejected == record["rejected"]

  def test_identical_is_error(self, tmp_path):
    path = _jsonl(tmp_path / "same.jsonl",
                  [{"chosen": "a", "rejected": "b"}, {"chosen": "x", "rejected": "x"}])
    with pytest.raises(data.DataError,
                       match=r"same.jsonl, line 2: fields 'chosen' and 'rejected' are identical"):
      data.load_preferences(path)

  def test_missing_rejected(self, tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"chosen": "a"}])
    with pytest.raises(data.DataError, match=r"m.jsonl, line 1: missing field 'rejected'"):
      data.load_preferences(path)

  def test_prompt_wrong_type(self, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [{"prompt": ["msg"], "chosen": "a", "rejected": "b"}])
    with pytest.raises(data.DataError,
                       match=r"w.jsonl, line 1: field 'prompt' must be a string, got list"):
      data.load_preferences(path)

  def test_parquet_and_hf_dir(self, tmp_path):
    columns = {"chosen": ["\n\nHuman: q\n\nAssistant: a", "c2"],
               "rejected": ["\n\nHuman: q\n\nAssistant: b", "r2"]}
    expected = [data.PreferencePair("\n\nHuman: q\n\nAssistant:", " a", " b"),
                data.PreferencePair("", "c2", "r2")]
    assert data.load_preferences(_parquet(tmp_path / "p.parquet", columns)) == expected
    assert data.load_preferences(_hf_dir(tmp_path / "ds", columns)) == expected

  def test_frozen(self):
    pair = data.PreferencePair("p", "c", "r")
    with pytest.raises(AttributeError):
      pair.prompt = "q"


class TestSFTAndWrite:

  def test_sft_round_trip_through_write_jsonl(self, tmp_path):
    examples = [data.SFTExample("", "héllo ✓"), data.SFTExample("q\nmulti", "line")]
    path = data.write_jsonl(str(tmp_path / "sub" / "sft.jsonl"),
                            ({"prompt": e.prompt, "completion": e.completion} for e in examples))
    assert data.load_sft(path) == examples
    assert os.listdir(tmp_path / "sub") == ["sft.jsonl"]
    with open(path, encoding="utf-8") as f:
      assert len(f.read().splitlines()) == 2

  def test_sft_blank_completion(self, tmp_path):
    path = _jsonl(tmp_path / "s.jsonl",
                  [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    with pytest.raises(data.DataError, match=r"s.jsonl, line 2: field 'completion' is blank"):
      data.load_sft(path)
