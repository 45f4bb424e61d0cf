"""Atomic, additive outputs and content hashes.

A run's outputs share directories with things it must never delete (TensorBoard logs, metrics,
checkpoints of the stage that wrote them). So a file is written beside its destination and renamed
over it (`write_atomic`), and a multi-file output such as a Hugging Face checkpoint is written
into a temporary sibling directory whose files are then renamed one by one into the destination
(`staging_dir`): each file a reader sees is complete, and every other entry of the destination is
left as it was. Everything gets the permissions of the process umask (`tempfile.mkdtemp` would
leave a checkpoint directory at 0700, safetensors its file at 0600).
"""

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator

# Entries a stage writes next to its model files: never part of a checkpoint's content hash.
RUN_OUTPUTS = frozenset({"metrics.jsonl", "stage.json", "tb", "checkpoints", "policy",
                         "samples.md", "curves.png"})


def _tmp_name(path: str) -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


def write_atomic(path: str, data: str | bytes) -> str:
  """Writes `data` to a temporary sibling of `path` and renames it over `path`; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return path


@contextlib.contextmanager
def staging_dir(path: str) -> Iterator[str]:
  """A fresh temporary sibling of directory `path` to write into; on success each of its entries
  is renamed into `path` (created if missing), replacing same-named ones and leaving the rest.

  On an exception the temporary directory is removed and `path` is untouched.
  """
  tmp = _tmp_name(path)
  shutil.rmtree(tmp, ignore_errors=True)   # left by a killed process with a recycled pid
  os.makedirs(tmp)
  try:
    yield tmp
    os.makedirs(path, exist_ok=True)
    # Writers that create files privately (safetensors: 0600) get the umask's mode, read off the
    # staging directory os.makedirs made.
    file_mode = os.stat(tmp).st_mode & 0o666
    for name in sorted(os.listdir(tmp)):
      src, dst = os.path.join(tmp, name), os.path.join(path, name)
      if os.path.isfile(src) and not os.path.islink(src):
        os.chmod(src, file_mode)
      if os.path.isdir(dst) and not os.path.islink(dst):   # os.replace cannot replace a directory
        shutil.rmtree(dst)
      os.replace(src, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def bytes_hash(data: bytes) -> str:
  """What `content_hash` gives for a file holding `data`."""
  return "sha256:" + hashlib.sha256(data).hexdigest()


def content_hash(path: str, skip: frozenset[str] = RUN_OUTPUTS) -> str:
  """"sha256:<hex>" of a file's bytes, or of a directory's files (relative names and bytes, in
  sorted order, at any depth), skipping entries named in `skip` and hidden (temporary) ones;
  "missing" when there is nothing at `path`."""
  if not os.path.exists(path):
    return "missing"
  h = hashlib.sha256()

  def add_file(p: str) -> None:
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)

  if os.path.isfile(path):
    add_file(path)
  else:
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
      for name in sorted(files):
        if name in skip or name.startswith("."):
          continue
        p = os.path.join(root, name)
        h.update(os.path.relpath(p, path).encode() + b"\0")
        add_file(p)
        h.update(b"\0")
  return "sha256:" + h.hexdigest()
