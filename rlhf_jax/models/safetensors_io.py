"""Lazy reads of safetensors files: each tensor a memory-mapped view, read only where sliced.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensors. Mapping
the file instead of loading it lets `from_pretrained` build each array shard by shard from just
the bytes that shard needs (a process of a pod reads only the slices its devices own), and reads
bfloat16 checkpoints, which `safetensors.numpy` cannot represent.
"""

import json
import os
import struct

import jax.numpy as jnp
import numpy as np

# safetensors dtype names -> numpy dtypes (bfloat16 is ml_dtypes', which jax.numpy exports).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
# A header larger than this is not a safetensors header (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A safetensors file whose header or layout is not valid."""


def _read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(f"header length {n} exceeds the file ({size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError("header is not a JSON object")
  header.pop("__metadata__", None)
  data_start, data_size = 8 + n, size - 8 - n
  for name, info in header.items():
    try:
      dtype = np.dtype(_DTYPES[info["dtype"]])
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"tensor {name!r}: malformed header entry {info!r}") from None
    if not 0 <= begin <= end <= data_size or end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(f"tensor {name!r}: offsets {begin}..{end} do not hold its "
                             f"{info['dtype']} {list(shape)} within the file")
  return header, data_start


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory: its index's shards, or model.safetensors."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise SafetensorsError(f"{index}: malformed safetensors index ({e!r})") from None
    files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    for f in files:
      if not os.path.isfile(f):
        raise SafetensorsError(f"{f}: listed in {index} but missing")
    return files
  if os.path.isfile(single):
    return [single]
  if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(path)):
    raise SafetensorsError(
        f"{path}: only pickle weights (.bin/.pt) found; rlhf_jax loads safetensors only because "
        "pickle can execute code. Convert with transformers: "
        "model.save_pretrained(dir, safe_serialization=True)")
  raise SafetensorsError(f"{path}: no model.safetensors or model.safetensors.index.json")


class TensorFiles:
  """The tensors of one or more safetensors files, by name, as read-only memory maps.

  `array(name)` is a `np.memmap` view: slicing it reads only the sliced bytes from disk.
  """

  def __init__(self, files: list[str]):
    self._where: dict[str, tuple[str, dict, int]] = {}
    for path in files:
      try:
        header, start = _read_header(path)
      except (OSError, SafetensorsError) as e:
        raise SafetensorsError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
      for name, info in header.items():
        self._where[name] = (path, info, start)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(_DTYPES[self._where[name][1]["dtype"]])

  def array(self, name: str) -> np.ndarray:
    path, info, start = self._where[name]
    begin, _ = info["data_offsets"]
    shape = self.shape(name)
    if not int(np.prod(shape)):   # np.memmap cannot map zero bytes
      return np.zeros(shape, self.dtype(name))
    # The format is little-endian, as is every host JAX runs on.
    return np.memmap(path, dtype=self.dtype(name), mode="r", offset=start + begin, shape=shape)
