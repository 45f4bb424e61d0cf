"""fileio: atomic writes, additive staging directories with normal permissions, content hashes."""

import hashlib
import os

import pytest

from rlhf_jax import fileio


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_staging_dir_replaces_its_files_and_keeps_everything_else(tmp_path):
  dst = tmp_path / "sft"
  (dst / "tb").mkdir(parents=True)
  (dst / "tb" / "events").write_text("log")
  (dst / "metrics.jsonl").write_text("{}\n")
  (dst / "config.json").write_text("old")
  with fileio.staging_dir(str(dst)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write("new")
    assert (dst / "config.json").read_text() == "old"   # nothing lands before the block ends
  assert (dst / "config.json").read_text() == "new"
  assert (dst / "tb" / "events").read_text() == "log"
  assert (dst / "metrics.jsonl").read_text() == "{}\n"
  assert sorted(os.listdir(tmp_path)) == ["sft"]   # the staging directory is gone


def test_a_failed_staging_block_leaves_the_destination_alone(tmp_path):
  dst = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with fileio.staging_dir(str(dst)) as tmp:
      open(os.path.join(tmp, "model.safetensors"), "w").close()
      raise RuntimeError("disk full")
  assert os.listdir(tmp_path) == []


def test_new_directories_and_files_get_the_umask_permissions(tmp_path):
  dst = tmp_path / "new"
  with fileio.staging_dir(str(dst)) as tmp:
    open(os.path.join(tmp, "a"), "w").close()
    os.close(os.open(os.path.join(tmp, "private"), os.O_CREAT | os.O_WRONLY, 0o600))
  fileio.write_atomic(str(tmp_path / "b.md"), "x")
  assert os.stat(dst).st_mode & 0o777 == 0o777 & ~_umask()
  assert os.stat(dst / "a").st_mode & 0o777 == 0o666 & ~_umask()
  assert os.stat(dst / "private").st_mode & 0o777 == 0o666 & ~_umask()   # as safetensors does
  assert os.stat(tmp_path / "b.md").st_mode & 0o777 == 0o666 & ~_umask()
  assert (tmp_path / "b.md").read_text() == "x"


def test_content_hash_of_files_and_checkpoint_directories(tmp_path):
  (tmp_path / "f").write_bytes(b"abc")
  assert fileio.content_hash(str(tmp_path / "f")) == (
      "sha256:" + hashlib.sha256(b"abc").hexdigest()) == fileio.bytes_hash(b"abc")
  ckpt = tmp_path / "ckpt"
  (ckpt / "tb").mkdir(parents=True)
  (ckpt / "model.safetensors").write_bytes(b"w")
  before = fileio.content_hash(str(ckpt))
  # The stage's own logs and records are not the checkpoint's content.
  (ckpt / "metrics.jsonl").write_text("{}\n")
  (ckpt / "stage.json").write_text("{}")
  (ckpt / "tb" / "events").write_text("log")
  (ckpt / ".model.tmp-1").write_text("partial")
  assert fileio.content_hash(str(ckpt)) == before
  (ckpt / "model.safetensors").write_bytes(b"v")
  assert fileio.content_hash(str(ckpt)) != before
  os.rename(ckpt / "model.safetensors", ckpt / "other.safetensors")   # names count too
  (ckpt / "other.safetensors").write_bytes(b"w")
  assert fileio.content_hash(str(ckpt)) != before
  assert fileio.content_hash(str(tmp_path / "nothing")) == "missing"
