"""Lazy safetensors reads, and `from_pretrained` building each shard from only its own slices."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from rlhf_jax import models
from rlhf_jax import sharding
from rlhf_jax.models import hf as hf_lib
from rlhf_jax.models import safetensors_io


def test_arrays_equal_torch_values_in_every_dtype(tmp_path):
  torch.manual_seed(0)
  want = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).to(torch.bfloat16),
          "f16": torch.randn(7).to(torch.float16), "i64": torch.arange(6).reshape(2, 3),
          "empty": torch.zeros(0, 4)}
  path = str(tmp_path / "t.safetensors")
  save_file(want, path)
  files = safetensors_io.TensorFiles([path])
  assert sorted(files.keys()) == sorted(want)
  for name, t in want.items():
    got = files.array(name)
    assert got.shape == tuple(t.shape)
    np.testing.assert_array_equal(np.asarray(got, np.float64), t.to(torch.float64).numpy())
  # A slice of the map is the slice of the tensor.
  np.testing.assert_array_equal(files.array("f32")[1:, 2:4], want["f32"][1:, 2:4].numpy())


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "huge_header"])
def test_damaged_files_are_named(tmp_path, damage):
  path = tmp_path / "t.safetensors"
  save_file({"w": torch.ones(64, 64)}, str(path))
  raw = path.read_bytes()
  path.write_bytes({"truncated": raw[:-100], "garbage_header": raw[:8] + b"x" * (len(raw) - 8),
                    "huge_header": (2 ** 40).to_bytes(8, "little") + raw[8:]}[damage])
  with pytest.raises(safetensors_io.SafetensorsError, match="t.safetensors: corrupt"):
    safetensors_io.TensorFiles([str(path)])


def _llama(path, dtype=torch.float32):
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
  model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
  model.save_pretrained(path, safe_serialization=True)


def _arrays(model):
  return nnx.to_pure_dict(nnx.state(model))


def test_mesh_load_equals_host_load_and_reads_each_block_once(tmp_path, monkeypatch):
  _llama(str(tmp_path))
  host = models.from_pretrained(str(tmp_path))
  reads = []
  original = hf_lib._Reader.read

  def spy(self, index, dtype):
    block = original(self, index, dtype)
    reads.append(block.size)
    return block
  monkeypatch.setattr(hf_lib._Reader, "read", spy)
  mesh = sharding.make_mesh((1, 4, 2))
  sharded = models.from_pretrained(str(tmp_path), mesh=mesh)
  q = sharded.decoder.layers.attn.q[...]   # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  embed = sharded.decoder.embed[...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               _arrays(host), _arrays(sharded))
  # Each distinct block is read once: the reads add up to the parameters' sizes on the 8
  # devices with replicated blocks counted once, not to 8 whole copies.
  arrays = jax.tree.leaves(_arrays(sharded))
  distinct = sum(sum(int(np.prod(s.data.shape)) for s in {
      tuple((sl.start, sl.stop) for sl in sh.index): sh
      for sh in a.addressable_shards}.values()) for a in arrays)
  assert sum(reads) == distinct
  assert sum(reads) < 8 * sum(a.size for a in arrays) / 2


def test_bfloat16_checkpoint_loads(tmp_path):
  _llama(str(tmp_path / "bf16"), torch.bfloat16)
  model = models.from_pretrained(str(tmp_path / "bf16"))
  want = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
  q = want.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()   # [H*D, d]
  got = np.asarray(model.decoder.layers.attn.q[...][1], np.float32)         # [d, H, D]
  np.testing.assert_array_equal(got.reshape(got.shape[0], -1), q.T)
  ids = np.arange(1, 17).reshape(2, 8)
  logits, _ = model(jax.numpy.asarray(ids))
  with torch.no_grad():
    ref = want.float()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4)
