"""Tests for rlhf_jax.trainers.dpo and the pipeline's "dpo" method."""

import dataclasses
import math
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import default as default_config
from rlhf_jax import data, models, pipeline
from rlhf_jax.config_tree import from_config_dict
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.optim import OptimConfig
from rlhf_jax.preference_losses import PreferenceLossConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers import dpo
from rlhf_jax.trainers import supervised as trainers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(data.vocabulary(), str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def task():
  return data.make_default_task(seed=3, n_sft=0, n_pairs=480, n_prompts=0, n_eval_prompts=16)


def _policy(tokenizer, seed=0, **kw):
  cfg = models.DecoderConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                             intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kw)
  return models.CausalLM(cfg, rngs=nnx.Rngs(seed))


def _cfg(**kw):
  base = dict(batch_size=16, epochs=1, max_len=24, eval_fraction=0.0, num_eval_prompts=0,
              max_prompt_len=12, sampling=SamplingConfig(max_new_tokens=8),
              optim=OptimConfig(learning_rate=1e-3, schedule="constant"))
  return dpo.DPOConfig(**{**base, **kw})


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_side_logps_match_a_numpy_sum_over_full_logits(tokenizer, task):
  policy = _policy(tokenizer, logits_chunk_size=5)   # several chunks, the last one padded
  batch = dpo.encode_pairs(tokenizer, task.preferences[:6], _cfg())
  got = jax.jit(lambda b: dpo.side_logps(policy, b, ("chosen", "rejected")))(batch)
  for side in ("chosen", "rejected"):
    ids, attn = batch[f"{side}_ids"], batch[f"{side}_attention_mask"]
    logits, _ = jax.jit(lambda i, a: policy(i, attention_mask=a))(ids, attn)
    logp = _log_softmax(np.asarray(logits, np.float64))
    want_sum, want_n = np.zeros(len(ids)), np.zeros(len(ids))
    for i in range(len(ids)):
      for t in range(1, ids.shape[1]):
        if batch[f"{side}_completion_mask"][i, t]:
          want_sum[i] += logp[i, t - 1, ids[i, t]]
          want_n[i] += 1
    np.testing.assert_allclose(got[side][0], want_sum, rtol=1e-4)
    np.testing.assert_array_equal(got[side][1], want_n)


def test_kto_rows_pair_each_prompt_with_the_previous_chosen_completion(tokenizer, task):
  pairs = task.preferences[:4]
  cfg = _cfg(loss=PreferenceLossConfig("kto"))
  batch = dpo.encode_pairs(tokenizer, pairs, cfg)
  want = data.encode_prompt_completion(tokenizer, [p.prompt for p in pairs],
                                       [pairs[i - 1].chosen for i in range(4)], cfg.max_len)
  np.testing.assert_array_equal(batch["kl_ids"], want.ids)
  np.testing.assert_array_equal(batch["kl_completion_mask"], want.completion_mask)
  assert "kl_ids" not in dpo.encode_pairs(tokenizer, pairs, _cfg())


def test_chat_template_renders_the_pairs_kto_rows_and_eval_prompts(tmp_path, task):
  tok = data.build_tokenizer(data.vocabulary(), str(tmp_path / "tok"))
  tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}: {% endif %}"
                       "{{ m['content'] }} {{ eos_token }} {% endfor %}"
                       "{% if add_generation_prompt %}:{% endif %}")
  pairs = task.preferences[:4]
  prompts = [p.prompt for p in pairs]
  cfg = _cfg(loss=PreferenceLossConfig("kto"), num_eval_prompts=4)
  batch = dpo.encode_pairs(tok, pairs, cfg, use_chat_template=True)
  want = data.encode_preferences(tok, pairs, cfg.max_len, use_chat_template=True)
  kl = data.encode_prompt_completion(tok, prompts, [pairs[i - 1].chosen for i in range(4)],
                                     cfg.max_len, use_chat_template=True)
  for key, value in (("chosen_ids", want.chosen_ids), ("rejected_ids", want.rejected_ids),
                     ("kl_ids", kl.ids), ("kl_completion_mask", kl.completion_mask)):
    np.testing.assert_array_equal(batch[key], value)
  ids, mask = dpo.prompt_arrays(tok, prompts, {}, cfg, use_chat_template=True)
  np.testing.assert_array_equal(ids, data.encode_prompts(tok, prompts, cfg.max_prompt_len,
                                                         use_chat_template=True).ids)
  assert (ids[:, -2:] == [tok.eos_token_id, tok.convert_tokens_to_ids(":")]).all()


def test_another_reference_policy_gives_the_first_rewards(tokenizer, task):
  """The seam a LoRA policy uses (its reference: the base with adapters off): with a reference
  other than the policy, the first step's rewards are beta times the log-ratio to it."""
  policy, other = _policy(tokenizer, 0), _policy(tokenizer, 1)
  pairs = task.preferences[:32]
  cfg = _cfg(epochs=1, batch_size=32, loss=PreferenceLossConfig("dpo", beta=0.5))
  _, history, _ = dpo.train_dpo(policy, tokenizer, pairs, cfg, ref_policy=other)
  batch = dpo.encode_pairs(tokenizer, pairs, cfg)
  lp, ref = (jax.jit(lambda b, m=m: dpo.side_logps(m, b, ("chosen",))["chosen"][0])(batch)
             for m in (policy, other))
  np.testing.assert_allclose(history[0]["chosen_reward"], 0.5 * np.mean(lp - ref), rtol=1e-4)


def test_microbatches_give_the_unsplit_step(tokenizer, task):
  policy = _policy(tokenizer)
  cfg = _cfg(batch_size=16)
  train = dpo.encode_pairs(tokenizer, task.preferences[:16], cfg)
  graphdef, params = nnx.split(policy)
  train.update(dpo.reference_logps(graphdef, params, train, ("chosen", "rejected"), 16, None))
  # A nonzero gradient: the reference is shifted away from the policy.
  train["ref_chosen_logps"] = train["ref_chosen_logps"] + 1.0
  loss_fn = lambda m, b: dpo.dpo_batch_loss(m, b, cfg.loss)
  out = []
  for micro in (None, 4):
    step = jax.jit(trainers.make_train_step(loss_fn, graphdef, optax.sgd(1e-2), micro))
    p = jax.tree.map(np.array, params)
    out.append(step(p, optax.sgd(1e-2).init(p), train))
  np.testing.assert_allclose(out[0][2]["loss"], out[1][2]["loss"], rtol=1e-6)
  np.testing.assert_allclose(out[0][2]["reward_accuracy"], out[1][2]["reward_accuracy"])
  for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_reference_free_loss_makes_no_reference_pass(tokenizer, task, monkeypatch):
  monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: pytest.fail("reference pass"))
  _, history, _ = dpo.train_dpo(_policy(tokenizer), tokenizer, task.preferences[:32],
                                _cfg(loss=PreferenceLossConfig("orpo", beta=1.0)))
  assert len(history) == 2 and all(np.isfinite(e["loss"]) for e in history)


def test_kto_reads_its_mismatched_rows_and_their_reference(tokenizer, task):
  # The policy starts as its reference: every log-ratio, so the reference point z0, is 0.
  _, history, final = dpo.train_dpo(
      _policy(tokenizer), tokenizer, task.preferences[:40],
      _cfg(batch_size=16, eval_fraction=0.2, loss=PreferenceLossConfig("kto", beta=0.5)))
  assert history[0]["reference_point"] == 0.0
  np.testing.assert_allclose(history[0]["loss"], 0.5, rtol=1e-6)   # 1 - sigma(0) on each side
  assert final["reference_point"] >= 0.0 and np.isfinite(final["loss"])


def test_dpo_learns_the_held_out_preferences(tokenizer, task):
  """Seeded: from the initial policy, its own reference (so the first loss is log 2, every
  reward 0), DPO ranks most held-out pairs right, with a positive margin and the policy moved
  away from the reference."""
  cfg = _cfg(epochs=2, batch_size=16, eval_fraction=0.2, eval_every=0, num_eval_prompts=16,
             loss=PreferenceLossConfig("dpo", beta=0.5),
             optim=OptimConfig(learning_rate=3e-3, schedule="constant"))
  policy = _policy(tokenizer)
  _, history, final = dpo.train_dpo(policy, tokenizer, task.preferences, cfg,
                                    eval_prompts=task.eval_prompts, gold_fn=data.gold_score)
  np.testing.assert_allclose(history[0]["loss"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(history[0]["reward_margin"], 0.0, atol=1e-6)
  assert history[-1]["loss"] < history[0]["loss"]
  assert final["reward_accuracy"] > 0.7, final
  assert final["reward_margin"] > 0.1 and final["loss"] < math.log(2.0)
  assert final["kl"] > 0 and final["win_rate"] > 0.5
  assert {"gold_score", "ref_gold_score", "distinct_2"} <= set(final)
  assert len(final["samples"]) == cfg.num_samples_logged


def test_dpo_method_of_the_pipeline_writes_its_stage(tmp_path):
  config = from_config_dict(pipeline.ExperimentConfig, default_config.get_config("smoke"))
  config = dataclasses.replace(config, method="dpo")
  final = pipeline.run_all(config, str(tmp_path))
  out = tmp_path / "dpo"
  assert not (tmp_path / "reward").exists() and not (tmp_path / "ppo").exists()
  assert {"gold_score", "ref_gold_score", "kl", "reward_accuracy"} <= set(final)
  records = read_jsonl(str(out / "metrics.jsonl"))
  assert any("final_gold_score" in r for r in records)
  assert (out / "samples.md").read_text().startswith("| prompt | completion | reward |")
  reloaded = models.from_pretrained(str(out))
  assert isinstance(reloaded, models.CausalLM) and os.path.exists(out / "tokenizer.json")


def test_unknown_method_is_rejected():
  with pytest.raises(ValueError, match="unknown method 'dpo2'"):
    pipeline.ExperimentConfig(method="dpo2")


def test_dpo_variant_selects_the_dpo_method():
  config = from_config_dict(pipeline.ExperimentConfig, default_config.get_config("dpo"))
  assert config.method == "dpo" and config.dpo.loss.name == "dpo"
  assert config.dpo.sampling == config.ppo.sampling   # the two methods sample alike
