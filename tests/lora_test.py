"""LoRA: adapter math against NumPy, targeting, the frozen base, merge and PEFT export against
`peft`, sharding on 8 devices, and LoRA PPO (learning, adapters-only updates, bitwise resume)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_ppo
from tiny_ppo import tokenizer  # noqa: F401  (fixture)
from rlhf_jax import kl as kl_lib
from rlhf_jax import models, optim, ppo, sharding
from rlhf_jax.collect import collect
from rlhf_jax.models import lora
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig

CFG = models.DecoderConfig(model_type="llama", vocab_size=32, hidden_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 32, (3, 7)), jnp.int32)
MASK = jnp.asarray([[1] * 7, [0, 0] + [1] * 5, [0] * 4 + [1] * 3], jnp.int32)


def _leaves(tree):
  """Host copies of the leaves, PRNG keys as their key data."""
  as_data = lambda x: (jax.random.key_data(x)
                       if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return jax.tree.leaves(jax.device_get(jax.tree.map(as_data, tree)))


@jax.jit
def _noisy(tree, key, std):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def _trained(model, seed=0, std=0.05):
  """`model` with noise added to every adapter (B is zero at init), so the adapters matter."""
  graphdef, frozen, trainable = lora.split(model)
  return nnx.merge(graphdef, frozen, _noisy(trainable, jax.random.key(seed), std))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]


def logits(model, ids=IDS, mask=MASK):
  """The model's logits, jitted (eager op-by-op dispatch is slow on a loaded machine)."""
  return _forward(*nnx.split(model), ids, mask)


@pytest.fixture(scope="module")
def base():
  return models.CausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def adapted(base):
  return _trained(lora.add_adapters(base, LORA, jax.random.key(1)))


@pytest.mark.parametrize("shape,contract", [((6,), "...i,ir->...r"),
                                            ((2, 3), "bhtk,hkr->btr")])
def test_adapter_is_scaled_low_rank_product(shape, contract):
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=shape + (4,)), rng.normal(size=(4, 5))
  x = rng.normal(size=(2, 3, 6)) if len(shape) == 1 else rng.normal(size=(2, 2, 3, 3))
  got = lora.Adapter(nnx.Param(jnp.asarray(a, jnp.float32)), nnx.Param(jnp.asarray(b, jnp.float32)),
                     2.0)(jnp.asarray(x, jnp.float32), contract)
  if len(shape) == 1:   # x [B, T, in]
    want = 2.0 * np.einsum("bti,ir,ro->bto", x, a, b)
  else:                 # the attention output [B, H, T, D] into o's [H, D, r]
    want = 2.0 * np.einsum("bhtk,hkr,ro->bto", x, a, b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_delta_is_scale_times_a_b_per_layer(adapted):
  for name, ad in lora.adapters(adapted).items():
    a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...])
    want = np.stack([(LORA.alpha / LORA.rank) * a[i].reshape(-1, 4) @ b[i].reshape(4, -1)
                     for i in range(CFG.num_layers)])
    got = np.asarray(lora.delta(ad))
    assert got.shape == a.shape[:-1] + b.shape[2:], name
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_fresh_adapters_give_the_base_logits_exactly_and_leave_the_base_alone(base):
  fresh = lora.add_adapters(base, LORA, jax.random.key(1))
  np.testing.assert_array_equal(logits(fresh), logits(base))
  assert not lora.adapters(base)   # the input model is unchanged
  for ad in lora.adapters(fresh).values():   # A is random, B zero (PEFT's init)
    assert np.abs(np.asarray(ad.a[...])).max() > 0 and not np.asarray(ad.b[...]).any()
  # Adapters share, not copy, the base's arrays.
  assert fresh.decoder.layers.attn.q[...] is base.decoder.layers.attn.q[...]


def test_adapters_off_is_the_base_model_over_the_same_arrays(base, adapted):
  ref_graphdef, ref_params = lora.base(adapted)
  _, frozen, _ = lora.split(adapted)
  want = logits(base)
  np.testing.assert_array_equal(logits(nnx.merge(ref_graphdef, frozen)), want)
  for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(frozen)):
    assert x is y
  assert np.abs(np.asarray(logits(adapted) - want)).max() > 1e-3


@pytest.mark.parametrize("regex,want", [
    (r"attn\.(q|v)", ["attn.q", "attn.v"]),
    (r"mlp\..*", ["mlp.gate", "mlp.up", "mlp.down"]),
    (r"attn\.o|mlp\.down", ["attn.o", "mlp.down"]),
])
def test_regex_selects_the_projections(base, regex, want):
  cfg = lora.LoRAConfig(rank=2, target_modules=regex)
  model = lora.add_adapters(base, cfg, jax.random.key(0))
  assert sorted(lora.adapters(model)) == sorted(want)
  assert sorted(p[-3:] for p, _ in lora.split(model)[2].flat_state()) == sorted(
      (n.split(".")[0], f"{n.split('.')[1]}_lora", ab) for n in want for ab in "ab")


def test_gpt2_has_no_gate_to_target():
  gpt2 = nnx.eval_shape(lambda: models.CausalLM(models.DecoderConfig(
      model_type="gpt2", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
      head_dim=8, intermediate_size=32, norm="layernorm", activation="gelu_new", gated_mlp=False,
      positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True), rngs=nnx.Rngs(0)))
  assert lora.targets(gpt2, lora.LoRAConfig(rank=2)) == [
      "attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]


@pytest.mark.parametrize("kw,msg", [(dict(rank=-1), "rank"), (dict(rank=2, alpha=0.0), "alpha"),
                                    (dict(rank=2, target_modules="attn.(q"), "not a regex"),
                                    (dict(rank=2, target_modules="q_proj"), "matches none"),
                                    (dict(rank=2, modules_to_save="head"), "matches none"),
                                    (dict(rank=2, modules_to_save="lm_(head"), "not a regex"),
                                    (dict(modules_to_save="lm_head"), "rank > 0")])
def test_bad_lora_config_is_a_clear_error(kw, msg):
  with pytest.raises(ValueError, match=msg):
    lora.LoRAConfig(**kw)


SAVE = lora.LoRAConfig(rank=4, alpha=8.0, modules_to_save="lm_head|embed")


def test_modules_to_save_train_copies_and_leave_the_base_weights_to_the_reference(base):
  fresh = lora.add_adapters(base, SAVE, jax.random.key(1))
  np.testing.assert_array_equal(logits(fresh), logits(base))   # copies start as the originals
  assert sorted(lora.saved(fresh)) == ["embed", "lm_head"]
  graphdef, frozen, trainable = lora.split(fresh)
  paths = {p for p, _ in trainable.flat_state()}
  assert ("lm_head_saved",) in paths and ("decoder", "embed_saved") in paths
  assert ("lm_head",) not in paths and ("decoder", "embed") not in paths
  # Training moves only the copies (and adapters): the adapters-off view is still the base.
  trained = nnx.merge(graphdef, frozen, _noisy(trainable, jax.random.key(3), 0.05))
  assert np.abs(np.asarray(logits(trained) - logits(base))).max() > 1e-3
  ref_graphdef, _ = lora.base(trained)
  np.testing.assert_array_equal(logits(nnx.merge(ref_graphdef, lora.split(trained)[1])),
                                logits(base))
  np.testing.assert_allclose(logits(lora.merged(trained)), logits(trained), atol=1e-5)
  with pytest.raises(ValueError, match="ties lm_head"):
    lora.add_adapters(models.CausalLM(dataclasses.replace(CFG, tie_word_embeddings=True),
                                      rngs=nnx.Rngs(0)), SAVE, jax.random.key(1))


def _lora_models(seed=0):
  policy = lora.add_adapters(models.CausalLM(CFG, rngs=nnx.Rngs(seed)), LORA, jax.random.key(7))
  value = lora.add_adapters(models.ScalarModel(CFG, rngs=nnx.Rngs(seed + 1)), LORA,
                            jax.random.key(8))
  return policy, value


def test_train_state_and_optimizer_cover_only_adapters_and_the_value_head():
  policy, value = _lora_models()
  pcfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=0))
  state = ppo.init_train_state(pcfg, policy, optim.make_optimizer(OptimConfig()),
                               jax.random.key(0), value)
  frozen = ppo.frozen_params(pcfg, policy, value)
  is_var = lambda x: isinstance(x, nnx.Variable)
  trained = jax.tree.leaves(state.params, is_leaf=is_var)
  assert all(isinstance(v, lora.LoRAParam) for v in jax.tree.leaves(
      state.params["policy"], is_leaf=is_var))
  value_paths = [p for p, _ in state.params["value"].flat_state()]
  assert ("head",) in value_paths and all(p == ("head",) or "lora" in p[-2] for p in value_paths)
  assert not any(lora.has_adapters(f) for f in frozen.values())
  n_trained = sum(v.size for v in trained)
  n_all = sum(x.size for x in jax.tree.leaves((nnx.state(policy), nnx.state(value))))
  assert n_trained == n_all - sum(x.size for x in jax.tree.leaves(frozen))
  # Adam's two moments are over the trained leaves only.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sorted(m.shape for m in moments) == sorted([v.shape for v in trained] * 2)


def test_merged_export_equals_the_adapted_model_and_round_trips(adapted, tmp_path):
  want = logits(adapted)
  merged = lora.merged(adapted)
  assert not lora.adapters(merged) and lora.adapters(adapted)
  np.testing.assert_allclose(logits(merged), want, atol=1e-5)
  models.save_pretrained(merged, str(tmp_path / "merged"))
  loaded = models.from_pretrained(str(tmp_path / "merged"), kind="causal_lm")
  np.testing.assert_allclose(logits(loaded), want, atol=1e-5)


@pytest.mark.parametrize("regex,save", [(LORA.target_modules, ""), (r"attn\.(q|v)", ""),
                                        (r"attn\.(q|v)", "lm_head|embed")])
def test_peft_adapter_directory_loads_in_peft_with_the_same_logits(base, tmp_path, regex, save):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  adapted = _trained(lora.add_adapters(base, lora.LoRAConfig(
      rank=4, alpha=8.0, target_modules=regex, modules_to_save=save), jax.random.key(1)), std=0.2)
  models.save_pretrained(base, str(tmp_path / "base"))
  lora.save_peft(adapted, str(tmp_path / "adapter"), base_model_name_or_path="base")
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    config = json.load(f)
  assert config["lora_alpha"] == 8.0
  assert config["modules_to_save"] == (["embed_tokens", "lm_head"] if save else None)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                         dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = model(input_ids=torch.tensor(np.asarray(IDS)),
                attention_mask=torch.tensor(np.asarray(MASK))).logits.numpy()
  want = np.asarray(logits(adapted))
  real = np.asarray(MASK) > 0   # transformers' logits at left padding are not comparable
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)
  assert np.abs(want - np.asarray(logits(base)))[real].max() > 1e-3


def test_adapters_take_the_base_weights_sharding_and_give_the_same_logits_on_8_devices(adapted):
  mesh = sharding.make_mesh((2, 2, 2))
  graphdef, state = nnx.split(adapted)
  shardings = sharding.param_shardings(state, mesh)
  spec = lambda *p: functools.reduce(lambda t, k: t[k], p, shardings).get_value().spec
  layers = ("decoder", "layers")
  assert spec(*layers, "attn", "q_lora", "a") == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert spec(*layers, "attn", "q_lora", "b") == jax.sharding.PartitionSpec(None, None, "tensor",
                                                                             None)
  assert spec(*layers, "mlp", "down_lora", "a")[1] == spec(*layers, "mlp", "down")[1] == "tensor"
  assert spec(*layers, "mlp", "down_lora", "b")[2] == spec(*layers, "mlp", "down")[2] == "fsdp"
  placed = sharding.put(state, shardings)
  forward = sharding.on_mesh(mesh, jax.jit(
      lambda s, ids, m: nnx.merge(graphdef, s)(ids, attention_mask=m)[0]))
  ids, mask = jnp.tile(IDS[:2], (2, 1)), jnp.tile(MASK[:2], (2, 1))
  np.testing.assert_allclose(forward(placed, ids, mask), logits(adapted, ids, mask), atol=1e-5)


def target_share(params, ro):
  del params
  m = ro.completion_mask
  return ((ro.completion_ids == 7) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def test_lora_ppo_learns_and_changes_only_the_adapters():
  policy = models.CausalLM(CFG, rngs=nnx.Rngs(0))
  # A random-init head (std 0.02) bounds every logit to within ~0.6 of the others whatever the
  # hidden state, so adapters below it could hardly move the policy; a trained head is larger.
  policy.lm_head.set_value(0.08 * jax.random.normal(jax.random.key(9), policy.lm_head.shape))
  cfg = lora.LoRAConfig(rank=8, alpha=16.0)
  policy = lora.add_adapters(policy, cfg, jax.random.key(7))
  value = lora.add_adapters(models.ScalarModel(CFG, rngs=nnx.Rngs(1)), cfg, jax.random.key(8))
  pcfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=8, eos_token_id=2, pad_token_id=0),
                       num_minibatches=4, kl=kl_lib.KLConfig(init_coef=0.05))
  tx = optim.make_optimizer(OptimConfig(learning_rate=1e-2))
  state = ppo.init_train_state(pcfg, policy, tx, jax.random.key(0), value)
  frozen = ppo.frozen_params(pcfg, policy, value)
  frozen_before = _leaves(frozen)
  start = _leaves(state.params)
  ref_graphdef = lora.base(policy)[0]
  run = jax.jit(functools.partial(collect, pcfg, ref_graphdef=ref_graphdef,
                                  reward_fn=target_share))
  update = jax.jit(ppo.ppo_update, static_argnums=0, donate_argnums=1)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 32, (32, 4)), jnp.int32)
  mask = jnp.ones_like(ids)
  hist = []
  for it in range(14):
    scored, m = run(state, ids, mask, jax.random.key(100 + it), ref_params=None,
                    reward_params=None, frozen=frozen)
    state, _ = update(pcfg, state, scored, frozen)
    hist.append(jax.device_get(m))
  first = np.mean([h["raw_score_mean"] for h in hist[:2]])
  last = np.mean([h["raw_score_mean"] for h in hist[-3:]])
  assert last > first + 0.1, (first, last)   # seeded: 0.027 -> 0.171 on CPU
  assert abs(hist[0]["kl"]) < 1e-5 and max(h["kl"] for h in hist) < 15.0
  for a, b in zip(frozen_before, _leaves(frozen)):   # the base is bitwise frozen
    np.testing.assert_array_equal(a, b)
  assert all(np.any(a != b) for a, b in zip(start, _leaves(state.params)))


def _trainer_run(tokenizer, workdir, max_steps):
  trainer, writer = tiny_ppo.trainer(tokenizer, workdir, max_steps, lora=LORA,
                                     optim=OptimConfig(learning_rate=3e-2))
  trainer.train()
  writer.close()
  return trainer


def test_lora_trainer_reference_is_the_base_and_resumes_bitwise(tmp_path, tokenizer):
  straight = _trainer_run(tokenizer, tmp_path / "a", 3)
  assert straight.ref_params is None   # no second copy: the reference reads frozen["policy"]
  assert all(lora.has_adapters(s) for s in straight.state.params.values())
  first = _trainer_run(tokenizer, tmp_path / "b", 2)
  resumed = _trainer_run(tokenizer, tmp_path / "b", 3)
  assert int(resumed.state.step) == 3 and len(resumed.history) == 1
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(first.frozen), _leaves(resumed.frozen)):
    np.testing.assert_array_equal(a, b)
  # The exported policy is the merged model: its logits are the adapted policy's.
  ids = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
  np.testing.assert_allclose(resumed.policy(ids)[0], resumed.adapted_policy(ids)[0], atol=1e-5)
