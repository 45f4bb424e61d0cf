"""Parity of our decoder families with transformers (PyTorch) on tiny random checkpoints."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rlhf_jax import models
from rlhf_jax import sharding

VOCAB = 97
PAD = 0


def _hf_config(family: str, **kw):
  common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
  if family == "gpt2":
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common, **kw)
  llama_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                    **common)
  if family == "llama3":
    return transformers.LlamaConfig(
        **llama_like, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8}, **kw)
  if family == "llama2":
    return transformers.LlamaConfig(**llama_like, **kw)
  if family == "qwen2":
    return transformers.Qwen2Config(**llama_like, tie_word_embeddings=True, **kw)
  if family == "qwen3":
    return transformers.Qwen3Config(**llama_like, head_dim=16, **kw)
  raise ValueError(family)


FAMILIES = ["gpt2", "llama2", "llama3", "qwen2", "qwen3"]


def _torch_model(family: str, scalar: bool, path: str):
  torch.manual_seed(0)
  cfg = _hf_config(family, num_labels=1) if scalar else _hf_config(family)
  cls = (transformers.AutoModelForSequenceClassification if scalar
         else transformers.AutoModelForCausalLM)
  model = cls.from_config(cfg).eval()
  # Non-zero biases and norm scales so every tensor's mapping is exercised.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _left_padded_batch(rng):
  lengths = [12, 7, 3]
  t = max(lengths)
  ids = np.full((len(lengths), t), PAD, np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for i, n in enumerate(lengths):
    ids[i, t - n:] = rng.integers(3, VOCAB, n)
    mask[i, t - n:] = 1
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
  return out.logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_parity_and_roundtrip(family, tmp_path):
  src, dst = str(tmp_path / "hf"), str(tmp_path / "ours")
  ref = _torch_model(family, scalar=False, path=src)
  ids, mask = _left_padded_batch(np.random.default_rng(0))
  want = _torch_logits(ref, ids, mask)

  model = models.from_pretrained(src)
  got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)

  models.save_pretrained(model, dst)
  back = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
  np.testing.assert_allclose(_torch_logits(back, ids, mask)[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_gradients_match_torch(family, tmp_path):
  """d/dparams of sum(logits * w) over real tokens, against torch autograd, tensor by tensor.

  Our gradient tree is written through `save_pretrained`'s mapping (tested by the roundtrip
  above), so every tensor is compared under its Hugging Face name.
  """
  src, dst = str(tmp_path / "hf"), str(tmp_path / "grads")
  ref = _torch_model(family, scalar=False, path=src)
  ids, mask = _left_padded_batch(np.random.default_rng(6))
  w = np.random.default_rng(7).normal(size=ids.shape + (VOCAB,)) * mask[..., None]
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos)).logits
  (out * torch.tensor(w, dtype=torch.float32)).sum().backward()
  want = {name: p.grad.numpy() for name, p in ref.named_parameters()}

  model = models.from_pretrained(src)
  graphdef, params = nnx.split(model)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return jnp.sum(logits * jnp.asarray(w, jnp.float32))

  grads = jax.jit(jax.grad(loss))(params)
  models.save_pretrained(nnx.merge(graphdef, grads), dst)
  from safetensors.numpy import load_file
  got = load_file(os.path.join(dst, "model.safetensors"))
  assert set(got) <= set(want) and len(got) >= 4 * ref.config.num_hidden_layers
  for name, g in got.items():
    scale = np.abs(want[name]).max() + 1e-3
    np.testing.assert_allclose(g, want[name], atol=1e-4 * scale, rtol=0, err_msg=name)


def _narrow(num_layers: int, **kw) -> models.DecoderConfig:
  return models.DecoderConfig(model_type="gpt2", vocab_size=VOCAB, num_layers=num_layers,
                              hidden_size=32, num_heads=4, head_dim=8, intermediate_size=64,
                              max_position_embeddings=16, norm="layernorm", activation="gelu_new",
                              gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True,
                              mlp_bias=True, **kw)


def _grad_fn(cfg: models.DecoderConfig):
  graphdef, params = nnx.split(models.CausalLM(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(8).integers(3, VOCAB, (2, 6)))
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(ids, attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, jnp.tanh(logits), 0.0))
  return jax.jit(jax.grad(loss)), params


def test_blocks_are_one_scanned_stack():
  # Every block parameter has a leading "layers" axis, and the program holds one block whatever
  # the depth: the lowered forward + backward has as many matmuls at 2 layers as at 6.
  counts = []
  for layers in (2, 6):
    blocks = models.CausalLM(_narrow(layers), rngs=nnx.Rngs(0)).decoder.layers
    for v in jax.tree.leaves(nnx.state(blocks), is_leaf=lambda x: isinstance(x, nnx.Variable)):
      assert v.axes[0] == "layers" and v.shape[0] == layers, v
    grad, params = _grad_fn(_narrow(layers))
    counts.append(grad.lower(params).as_text().count("dot_general"))
  assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("remat", ["save_all_dots", "full", "save_dots", "offload"])
def test_remat_policies_give_the_gradients_of_no_remat(remat):
  want_fn, params = _grad_fn(_narrow(3, remat="none"))
  got_fn, _ = _grad_fn(_narrow(3, remat=remat))
  want, got = want_fn(params), got_fn(params)
  # Float32 rounding relative to each gradient's scale (the key bias's is 0 up to rounding).
  for (kp, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-6 * (np.abs(w).max() + 1), rtol=0,
                               err_msg=jax.tree_util.keystr(kp))
  if remat == "full":   # really rematerialised: the backward recomputes the blocks' matmuls
    count = lambda fn: fn.lower(params).as_text().count("dot_general")
    assert count(got_fn) > count(want_fn)


def test_remat_is_validated_and_never_exported(tmp_path):
  with pytest.raises(models.ConfigError, match="remat='some' not in"):
    _narrow(2, remat="some")
  model = models.CausalLM(_narrow(2, remat="full"), rngs=nnx.Rngs(0))
  models.save_pretrained(model, str(tmp_path))
  assert "remat" not in json.load(open(tmp_path / "config.json"))
  assert models.from_pretrained(str(tmp_path)).cfg.remat == models.DecoderConfig().remat
  assert models.from_pretrained(str(tmp_path), remat="save_dots").cfg.remat == "save_dots"


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2"])
def test_sequence_classification_parity_and_roundtrip(family, tmp_path):
  src, dst = str(tmp_path / "hf"), str(tmp_path / "ours")
  ref = _torch_model(family, scalar=True, path=src)
  ids, mask = _left_padded_batch(np.random.default_rng(1))
  want = _torch_logits(ref, ids, mask)[:, 0]   # HF reads the last non-pad token

  model = models.from_pretrained(src)
  assert isinstance(model, models.ScalarModel)
  got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  models.save_pretrained(model, dst)
  back = transformers.AutoModelForSequenceClassification.from_pretrained(dst).eval()
  np.testing.assert_allclose(_torch_logits(back, ids, mask)[:, 0], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_kv_cache_decode_matches_full_forward(family, tmp_path):
  _torch_model(family, scalar=False, path=str(tmp_path))
  model = models.from_pretrained(str(tmp_path))
  graphdef, params = nnx.split(model)
  ids, mask = _left_padded_batch(np.random.default_rng(2))
  b, p = ids.shape
  new = np.random.default_rng(3).integers(3, VOCAB, (b, 5))
  full_ids = np.concatenate([ids, new], 1)
  full_mask = np.concatenate([mask, np.ones_like(new)], 1)
  want = np.asarray(model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask))[0])

  @jax.jit
  def prefill(params, ids, mask):
    m = nnx.merge(graphdef, params)
    cache = models.init_cache(m.cfg, b, p + new.shape[1])
    return m(ids, attention_mask=mask, cache=cache)

  @jax.jit
  def step(params, tok, cache):
    return nnx.merge(graphdef, params)(tok[:, None], cache=cache)

  logits, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], want[:, :p][valid], atol=1e-4)
  for t in range(new.shape[1]):
    logits, cache = step(params, jnp.asarray(new[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, p + t], atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_keep_equals_the_slice_of_the_full_forward(family, tmp_path):
  """`keep` with `last_block_rows` (the last block computes the kept rows alone) gives the
  full forward's rows and gradients; without it, `keep` is a plain slice."""
  _torch_model(family, scalar=False, path=str(tmp_path))
  model = models.from_pretrained(str(tmp_path), last_block_rows=True)
  graphdef, params = nnx.split(model.decoder)
  ids, mask = map(jnp.asarray, _left_padded_batch(np.random.default_rng(5)))
  t = ids.shape[1]
  cache = models.init_cache(model.cfg, ids.shape[0], t + 2)

  @functools.partial(jax.jit, static_argnames=("keep", "cached"))
  def decoder(keep=None, cached=False):
    return nnx.merge(graphdef, params)(ids, attention_mask=mask, cache=cache if cached else None,
                                       keep=keep)

  full, _ = decoder()
  for start, stop in [(0, t), (2, 5), (t - 1, t)]:
    kept, _ = decoder(keep=(start, stop))
    assert kept.shape == (ids.shape[0], stop - start, model.cfg.hidden_size)
    np.testing.assert_allclose(kept, full[:, start:stop], atol=2e-5, rtol=0)
  # The kept rows skip the last block's other queries, which must not change any gradient.
  start, stop = 2, 5
  w = jax.random.normal(jax.random.key(0), (ids.shape[0], stop - start, model.cfg.hidden_size))
  grad = lambda keep: jax.jit(jax.grad(lambda p: jnp.sum(w * nnx.merge(graphdef, p)(
      ids, attention_mask=mask, keep=keep)[0][:, -(stop - start):])))(params)
  for got, want in zip(jax.tree.leaves(grad((start, stop))), jax.tree.leaves(grad((0, stop)))):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # With a cache (a prefill): the same rows, and a cache that is filled at every position.
  kept, kept_cache = decoder(keep=(t - 1, t), cached=True)
  _, full_cache = decoder(cached=True)
  np.testing.assert_allclose(kept, full[:, t - 1:], atol=2e-5, rtol=0)
  for got, want in zip(jax.tree.leaves(kept_cache), jax.tree.leaves(full_cache)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for bad in [(3, 3), (-1, 2), (0, t + 1)]:
    with pytest.raises(ValueError, match=rf"keep=\({bad[0]}, {bad[1]}\) is not a non-empty range"):
      decoder(keep=bad)


def test_left_padding_does_not_change_logits():
  cfg = models.DecoderConfig(model_type="qwen3", vocab_size=VOCAB, qk_norm=True, num_kv_heads=2)
  model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  seq = np.random.default_rng(4).integers(3, VOCAB, (1, 6))
  ref = np.asarray(model(jnp.asarray(seq))[0])
  for pad in (1, 5):
    ids = np.concatenate([np.full((1, pad), PAD), seq], 1)
    mask = np.concatenate([np.zeros((1, pad)), np.ones_like(seq)], 1)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
    np.testing.assert_allclose(got[:, pad:], ref, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_single_device(mesh_shape):
  cfg = models.DecoderConfig(model_type="llama", vocab_size=96, hidden_size=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, intermediate_size=128)
  model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 96, (8, 10)))

  def fwd(params, ids):
    return nnx.merge(graphdef, params)(ids)[0]

  want = np.asarray(jax.jit(fwd)(params, ids))
  mesh = sharding.make_mesh(mesh_shape)
  shardings = sharding.param_shardings(params, mesh)
  sharded = jax.device_put(params, shardings)
  assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(sharded))
  ids_sharded = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
  got = jax.jit(fwd)(sharded, ids_sharded)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # With the mesh set, the activations are pinned by their logical axes; without, they are not.
  assert "sharding_constraint" not in jax.jit(fwd).lower(sharded, ids_sharded).as_text()
  with jax.set_mesh(mesh):
    pinned = jax.jit(fwd)
    assert "sharding_constraint" in pinned.lower(sharded, ids_sharded).as_text()
    got = pinned(sharded, ids_sharded)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  with pytest.raises(ValueError, match="do not match an array of shape"):
    sharding.constrain(ids, ("activation_batch",))


def test_from_pretrained_places_params_on_mesh(tmp_path):
  _torch_model("llama2", scalar=False, path=str(tmp_path))
  mesh = sharding.make_mesh((1, 2, 4))
  model = models.from_pretrained(str(tmp_path),
                                 shardings=lambda m: sharding.param_shardings(m, mesh))
  q = model.decoder.layers.attn.q[...]   # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_bfloat16_compute_close_to_float32(tmp_path):
  _torch_model("llama2", scalar=False, path=str(tmp_path))
  ids, mask = _left_padded_batch(np.random.default_rng(6))
  f32 = models.from_pretrained(str(tmp_path))
  bf16 = models.from_pretrained(str(tmp_path), dtype="bfloat16")
  a = np.asarray(f32(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
  b = np.asarray(bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
  valid = mask.astype(bool)
  assert b.dtype == np.float32
  np.testing.assert_allclose(b[valid], a[valid], atol=0.05)
  assert not np.allclose(b[valid], a[valid], atol=1e-6)   # really computed in bf16


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
def test_from_scratch_family_round_trips(family, tmp_path):
  """A model configured by `model_type` alone takes its family's switches, exports as a
  config.json of that family, and reads back (ours and transformers') with the same logits."""
  cfg = models.DecoderConfig(model_type=family, vocab_size=VOCAB, hidden_size=32, num_layers=2,
                             num_heads=4, num_kv_heads=4, head_dim=8, intermediate_size=48,
                             max_position_embeddings=64, pad_token_id=PAD, eos_token_id=2)
  graphdef, state = nnx.split(models.CausalLM(cfg, rngs=nnx.Rngs(0)))
  # Non-zero biases and norm offsets: a switch lost in export would change the logits.
  leaves, treedef = jax.tree.flatten(state)
  noise = jax.random.split(jax.random.key(1), len(leaves))
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, noise)]))
  ids, mask = _left_padded_batch(np.random.default_rng(7))
  want = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
  valid = mask.astype(bool)

  models.save_pretrained(model, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["model_type"] == family
  back = models.from_pretrained(str(tmp_path))
  switches = lambda c: {k: getattr(c, k) for k in models.config.FAMILY_DEFAULTS[family]}
  assert switches(back.cfg) == switches(cfg)
  got = np.asarray(back(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=0)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert ref.config.model_type == family
  np.testing.assert_allclose(_torch_logits(ref, ids, mask)[valid], want[valid], atol=1e-4, rtol=0)


def test_family_switches_follow_model_type_unless_set():
  gpt2 = models.DecoderConfig(model_type="gpt2")
  assert (gpt2.norm, gpt2.positions, gpt2.activation, gpt2.gated_mlp, gpt2.tie_word_embeddings,
          gpt2.qkv_bias, gpt2.out_bias, gpt2.mlp_bias) == (
              "layernorm", "learned", "gelu_new", False, True, True, True, True)
  assert models.DecoderConfig(model_type="qwen2").qkv_bias
  assert models.DecoderConfig(model_type="qwen3").qk_norm
  assert not models.DecoderConfig(model_type="gpt2", tie_word_embeddings=False).tie_word_embeddings
  with pytest.raises(models.ConfigError, match="cannot be exported with qk_norm=False"):
    models.save_pretrained(models.CausalLM(models.DecoderConfig(
        model_type="qwen3", vocab_size=VOCAB, qk_norm=False), rngs=nnx.Rngs(0)), "/nonexistent")


class TestBadCheckpoints:

  def _good(self, tmp_path):
    _torch_model("llama2", scalar=False, path=str(tmp_path))
    return str(tmp_path)

  def test_missing_dir(self, tmp_path):
    with pytest.raises(models.CheckpointError, match="does not exist"):
      models.from_pretrained(str(tmp_path / "nope"))

  def test_pickle_only_refused(self, tmp_path):
    path = self._good(tmp_path)
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(models.CheckpointError, match="safetensors only"):
      models.from_pretrained(path)

  def test_unsupported_model_type(self, tmp_path):
    path = self._good(tmp_path)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(models.ConfigError, match="unsupported model_type 'mamba'"):
      models.from_pretrained(path)

  def test_shape_mismatch(self, tmp_path):
    path = self._good(tmp_path)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["intermediate_size"] = 64
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(models.CheckpointError, match="gate_proj.weight.*shape"):
      models.from_pretrained(path)

  def test_corrupt_safetensors(self, tmp_path):
    path = self._good(tmp_path)
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(models.CheckpointError, match="corrupt"):
      models.from_pretrained(path)

  def test_bad_config_json(self, tmp_path):
    path = self._good(tmp_path)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(models.CheckpointError, match="config.json: not valid JSON"):
      models.from_pretrained(path)
