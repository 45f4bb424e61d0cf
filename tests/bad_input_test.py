"""Malformed inputs through the command line (`experiments.rlhf`, flags parsed as `app.run` does):
each ends with exit status 2 and one `error:` line naming the problem, no traceback, the files an
earlier run left in the workdir unchanged byte for byte, and nothing new there beyond logs. The
settings of later stages fail before the first stage trains (`rlhf_jax.preflight`), so no case
trains anything.

The mains run in-process (one interpreter for the whole table) rather than as subprocesses,
which would spend ~10 s each on imports.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from experiments import common
from experiments import rlhf as rlhf_main
from rlhf_jax import checkpointing, data, models, pipeline, ppo
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig
from rlhf_jax.trainers.reward import RewardConfig

import tiny_ppo

LOGS = ("metrics.jsonl", "tb")   # what a stage may create before it fails


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  return tiny_ppo.write_inputs(tmp_path_factory.mktemp("inputs"))


def _write(path, text: str | bytes) -> str:
  with open(path, "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)
  return str(path)


def _copy_model(src: str, dst, drop: str | None = None, replace: dict | None = None) -> str:
  shutil.copytree(src, dst)
  if drop:
    os.remove(os.path.join(dst, drop))
  for name, content in (replace or {}).items():
    _write(os.path.join(dst, name), content)
  return str(dst)


def _tokenizer(path, words: list[str]) -> str:
  data.build_tokenizer(words, str(path))
  return str(path)


def _other_runs_checkpoint(workdir) -> dict:
  """A checkpoint of a wider model in <workdir>/ppo/checkpoints, as another run left it."""
  tok = data.build_tokenizer(tiny_ppo.WORDS, str(workdir.parent / "other_tok"))
  cfg = tiny_ppo.model_cfg(tok, hidden_size=24)
  state = ppo.init_train_state(
      ppo.PPOConfig(), models.CausalLM(cfg, rngs=nnx.Rngs(0)), make_optimizer(OptimConfig()),
      jax.random.key(0), models.ScalarModel(cfg, rngs=nnx.Rngs(1)))
  ckpt = checkpointing.Checkpointer(str(workdir / "ppo" / "checkpoints"), every=1, keep=1,
                                    fingerprint={})
  ckpt.save(1, state, {})
  ckpt.wait()
  return {}


# The built-in task with a policy and reward model trained in this run: a case's bad setting must
# fail before SFT trains (or anything is written).
SCRATCH = {"task.name": "default", "policy_path": "", "reward_path": "", "tokenizer_path": "",
           "prompts": "", "eval_prompts": ""}


def _scratch(**overrides) -> dict:
  return {**SCRATCH, **overrides}


def _truncated(src: str, dst, name: str) -> str:
  """A copy of directory `src` whose file `name` lost its second half."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, name)
  with open(path, "rb") as f:
    content = f.read()
  _write(path, content[:len(content) // 2])
  return str(dst)


def _long_sft(t) -> str:
  return _write(t / "sft.jsonl", json.dumps({"prompt": "good", "completion": " ".join(
      ["nice"] * 30)}) + "\n")


def _one_sft_example(t) -> dict:
  """An SFT stage of one demonstration (it trains from --config.policy_path)."""
  return {"sft_data": _write(t / "sft.jsonl", '{"prompt": "good", "completion": "nice"}\n'),
          "sft.batch_size": 1, "sft.eval_fraction": 0.0}


def _long_prefs(t) -> str:
  return _write(t / "prefs.jsonl", json.dumps({"prompt": "good", "chosen": "nice",
                                               "rejected": " ".join(["bad"] * 30)}) + "\n")


# (case id, setup(tmp_path, inputs) -> config overrides, expected fragment of the error line)
CASES = [
    ("missing_prompts", lambda t, i: {"prompts": str(t / "nope.jsonl")},
     "nope.jsonl: no such file"),
    ("empty_prompts", lambda t, i: {"prompts": _write(t / "p.jsonl", "")}, "no prompts"),
    ("bad_json_line", lambda t, i: {"prompts": _write(t / "p.jsonl", '{"prompt": "good"}\n{"pro')},
     "line 2"),
    ("missing_field", lambda t, i: {"prompts": _write(t / "p.jsonl", '{"text": "good"}\n')},
     "'prompt'"),
    ("non_string_field", lambda t, i: {"prompts": _write(t / "p.jsonl", '{"prompt": 3}\n')},
     "must be a string"),
    ("blank_prompt", lambda t, i: {"prompts": _write(t / "p.jsonl", '{"prompt": " "}\n')},
     "blank"),
    ("not_utf8", lambda t, i: {"prompts": _write(t / "p.jsonl", b'{"prompt": "\xff\xfe"}\n')},
     "UTF-8"),
    ("too_few_prompts", lambda t, i: {"prompts": _write(
        t / "p.jsonl", "".join(json.dumps({"prompt": "good"}) + "\n" for _ in range(3)))},
     "cannot fill one batch"),
    ("overlong_sequences", lambda t, i: {"ppo.max_prompt_len": 12,
                                         "ppo.sampling.max_new_tokens": 8},
     "max_position_embeddings"),
    ("vocab_mismatch", lambda t, i: {"tokenizer_path": _tokenizer(
        t / "tok", tiny_ppo.WORDS + ["extra", "words", "here"])}, "tokens but"),
    ("missing_safetensors", lambda t, i: {"policy_path": _copy_model(
        i["policy_path"], t / "pol", drop="model.safetensors")}, "no model.safetensors"),
    ("corrupt_safetensors", lambda t, i: {"policy_path": _copy_model(
        i["policy_path"], t / "pol", replace={"model.safetensors": b"\x08garbage"})},
     "corrupt or unreadable safetensors"),
    ("corrupt_config_json", lambda t, i: {"reward_path": _copy_model(
        i["reward_path"], t / "rm", replace={"config.json": "{not json"})}, "not valid JSON"),
    ("missing_model_dir", lambda t, i: {"policy_path": str(t / "nowhere")}, "does not exist"),
    ("missing_tokenizer_dir", lambda t, i: {"tokenizer_path": str(t / "nowhere")},
     "does not exist"),
    ("unknown_config_key", lambda t, i: {"ppo.bogus": 1},
     "unknown config field --config.ppo.bogus"),
    ("unknown_nested_config_key", lambda t, i: {"ppo.policy_loss.bogus": 1},
     "unknown config field --config.ppo.policy_loss.bogus"),
    ("misspelt_config_section", lambda t, i: {"ppo.polcy_loss.clip_eps": 0.3},
     "unknown config field --config.ppo.polcy_loss.clip_eps"),
    ("unknown_key_without_config_flag", lambda t, i: {"__config": None, "model.bogus": 1},
     "unknown config field --config.model.bogus"),
    ("unknown_variant", lambda t, i: {"__config": "experiments/configs/default.py:nosuch"},
     "unknown config variant 'nosuch'"),
    ("unknown_policy_loss", lambda t, i: {"ppo.policy_loss.name": "nope"}, "nope"),
    ("unknown_method", lambda t, i: {"method": "sac"},
     "--config: unknown method 'sac': use 'ppo' or 'dpo'"),
    ("missing_plugin_module", lambda t, i: {"plugins": "no_such_plugin_mod"},
     "plugin 'no_such_plugin_mod' could not be imported: ModuleNotFoundError"),
    ("unknown_reward_term", lambda t, i: {"ppo.rewards.terms": "reward_model+0.5*nosuch"},
     "--config.ppo.rewards: unknown reward 'nosuch'; registered: "),
    ("unknown_mismatch_correction", lambda t, i: {"ppo.mismatch.correction": "tis2"},
     "--config.ppo.mismatch: unknown mismatch correction 'tis2'; registered: "),
    ("indivisible_minibatches", lambda t, i: {"ppo.num_minibatches": 3}, "not divisible"),
    # No policy or reward given: the bad setting must fail before SFT and reward training write.
    ("bad_top_p_before_sft", lambda t, i: {"policy_path": "", "reward_path": "",
                                           "ppo.sampling.top_p": 0.0},
     "top_p must be in (0, 1], got 0.0"),
    ("zero_temperature", lambda t, i: {"ppo.sampling.temperature": 0.0},
     "temperature must be > 0"),
    ("bad_frozen_dtype", lambda t, i: {"ppo.frozen_param_dtype": "bf17"},
     "frozen_param_dtype 'bf17' is not a dtype"),
    ("zero_logits_chunk", lambda t, i: {"model.logits_chunk_size": 0},
     "logits_chunk_size must be >= 1"),
    ("non_boolean_last_block_rows", lambda t, i: {"model.last_block_rows": "maybe"},
     "--config.model.last_block_rows=maybe: ('Non-boolean argument to boolean flag'"),
    ("mesh_vs_devices", lambda t, i: {"mesh_shape": "(3,1,1)"}, "needs 3 devices, but 8 are available"),
    ("sft_example_without_completion", lambda t, i: {"sft_data": _write(
        t / "sft.jsonl", '{"prompt": "good"}\n')}, "'completion'"),
    ("preference_without_rejected", lambda t, i: {"reward_path": "", "preferences": _write(
        t / "prefs.jsonl", '{"prompt": "a", "chosen": "good"}\n')}, "'rejected'"),
    ("other_runs_checkpoint", lambda t, i: _other_runs_checkpoint(t / "work"),
     "does not match this run"),
    # Each stage's settings, checked before SFT trains: one dataclass each ...
    ("nan_sft_learning_rate", lambda t, i: _scratch(**{"sft.optim.learning_rate": "nan"}),
     "--config.sft.optim: learning_rate must be finite and > 0, got nan"),
    ("zero_ppo_learning_rate", lambda t, i: _scratch(**{"ppo.optim.learning_rate": 0.0}),
     "--config.ppo.optim: learning_rate must be finite and > 0, got 0.0"),
    ("unknown_schedule", lambda t, i: _scratch(**{"reward.optim.schedule": "cosin"}),
     "--config.reward.optim: unknown schedule 'cosin'"),
    ("negative_sft_batch", lambda t, i: _scratch(**{"sft.batch_size": -4}),
     "--config.sft: batch_size must be >= 1, got -4"),
    ("negative_ppo_batch", lambda t, i: _scratch(**{"ppo.batch_size": -8}),
     "--config.ppo: batch_size must be >= 1, got -8"),
    ("eval_fraction_out_of_range", lambda t, i: _scratch(**{"reward.eval_fraction": 1.5}),
     "--config.reward: eval_fraction must be in [0, 1), got 1.5"),
    ("nan_center_coef", lambda t, i: _scratch(**{"reward.center_coef": "nan"}),
     "--config.reward: center_coef must be >= 0"),
    ("keep_no_checkpoints", lambda t, i: _scratch(**{"ppo.keep_checkpoints": 0}),
     "--config.ppo: keep_checkpoints must be >= 1, got 0"),
    ("zero_max_steps", lambda t, i: _scratch(**{"ppo.max_steps": 0}),
     "--config.ppo: max_steps must be >= 1, got 0"),
    ("negative_ppo_checkpoint_every", lambda t, i: _scratch(**{"ppo.checkpoint_every": -1}),
     "--config.ppo: checkpoint_every must be >= 0, got -1"),
    ("negative_sft_checkpoint_every", lambda t, i: _scratch(**{"sft.checkpoint_every": -5}),
     "--config.sft: checkpoint_every must be >= 0, got -5"),
    ("zero_length_buckets", lambda t, i: _scratch(**{"sft.length_buckets": 0}),
     "--config.sft: length_buckets must be >= 1, got 0"),
    ("negative_length_buckets", lambda t, i: _scratch(**{"reward.length_buckets": -2}),
     "--config.reward: length_buckets must be >= 1, got -2"),
    ("negative_lora_rank", lambda t, i: _scratch(**{"ppo.lora.rank": -1}),
     "--config.ppo.lora: lora.rank must be >= 0 (0: off), got -1"),
    ("lora_targets_nothing", lambda t, i: _scratch(**{"ppo.lora.rank": 4,
                                                      "ppo.lora.target_modules": "mlp.fc"}),
     "--config.ppo.lora: lora.target_modules 'mlp.fc' matches none of"),
    ("lora_saves_nothing", lambda t, i: _scratch(**{"ppo.lora.rank": 4,
                                                    "ppo.lora.modules_to_save": "head"}),
     "--config.ppo.lora: lora.modules_to_save 'head' matches none of lm_head, embed"),
    ("dynamic_sampling_without_groups",
     lambda t, i: _scratch(**{"ppo.dynamic_sampling.enabled": True}),
     "dynamic_sampling compares the rewards within a group: it needs group_size > 1, got 1"),
    ("dynamic_sampling_no_batches",
     lambda t, i: _scratch(**{"ppo.dynamic_sampling.max_batches": 0}),
     "dynamic_sampling.max_batches must be >= 1, got 0"),
    ("threshold_without_evaluation", lambda t, i: _scratch(**{"ppo.reward_threshold": 1.0,
                                                              "ppo.eval_every": 0}),
     "reward_threshold is checked at evaluations: it needs eval_every > 0"),
    ("zero_layers", lambda t, i: _scratch(**{"model.num_layers": 0}),
     "--config.model: num_layers must be >= 1, got 0"),
    ("negative_task_size", lambda t, i: _scratch(**{"task.num_pairs": -1}),
     "--config.task: num_pairs must be >= 0, got -1"),
    # ... and across stages, the tokenizer, the checkpoints and the data.
    ("top_k_above_vocab", lambda t, i: _scratch(**{"ppo.sampling.top_k": 100_000}),
     "--config.ppo.sampling.top_k=100000 exceeds the policy's vocabulary"),
    ("sft_max_len_above_positions", lambda t, i: _scratch(**{"sft.max_len": 65}),
     "--config.sft.max_len=65 exceeds the model's positions: 64 "
     "(--config.model.max_position_embeddings)"),
    ("reward_max_len_above_positions", lambda t, i: _scratch(**{"reward.max_len": 100}),
     "--config.reward.max_len=100 exceeds the model's positions"),
    ("ppo_lengths_above_positions_before_sft", lambda t, i: _scratch(**{
        "ppo.max_prompt_len": 61}), "exceeds the policy's max_position_embeddings = 64"),
    ("too_few_sft_rows", lambda t, i: _scratch(**{"task.num_sft": 20}),
     "--config.sft: 19 training rows (of 20, after the eval_fraction=0.05 split) are fewer than "
     "batch_size=32"),
    ("too_few_task_prompts", lambda t, i: _scratch(**{"task.num_prompts": 4}),
     "--config.task.num_prompts=4 prompts cannot fill one batch of --config.ppo.batch_size=8"),
    ("bad_prompts_before_sft", lambda t, i: _scratch(prompts=_write(
        t / "p.jsonl", '{"prompt": "good"}\n{"pro')), "line 2"),
    ("missing_gold_judge_module", lambda t, i: _scratch(gold_judge="no_such_judge_mod:score"),
     "No module named 'no_such_judge_mod'"),
    ("own_task_without_sft_data", lambda t, i: {"policy_path": "", "reward_path": ""},
     "--config.sft_data is empty"),
    ("gpt2_from_scratch_with_gqa", lambda t, i: _scratch(**{"model.model_type": "gpt2"}),
     "--config.model: model_type='gpt2' has no grouped-query attention: num_kv_heads=1 must "
     "equal num_heads=2"),
    ("qwen3_without_qk_norm", lambda t, i: _scratch(**{"model.model_type": "qwen3",
                                                       "model.qk_norm": False}),
     "model_type='qwen3' cannot be exported with qk_norm=False"),
    ("causal_lm_as_reward_model", lambda t, i: {"reward_path": i["policy_path"]},
     "is a causal LM, not a reward model"),
    ("reward_model_as_policy", lambda t, i: {"policy_path": i["reward_path"]},
     "is a reward model (*ForSequenceClassification)"),
    ("tokenizer_without_vocabulary", lambda t, i: {"tokenizer_path": _copy_model(
        i["tokenizer_path"], t / "tok", drop="tokenizer.json")},
     "no tokenizer vocabulary (none of tokenizer.json"),
    ("truncated_tokenizer_json", lambda t, i: {"tokenizer_path": _truncated(
        i["tokenizer_path"], t / "tok", "tokenizer.json")},
     "tok/tokenizer.json: not valid JSON"),
    ("truncated_tokenizer_config", lambda t, i: {"tokenizer_path": _truncated(
        i["tokenizer_path"], t / "tok", "tokenizer_config.json")},
     "tok/tokenizer_config.json: not valid JSON"),
    ("tokenizer_without_chat_template", lambda t, i: {"use_chat_template": True},
     "/tok has no chat template (a chat_template in its tokenizer_config.json"),
    ("pair_without_prompt_under_chat_template", lambda t, i: {
        "use_chat_template": True, "reward_path": "",
        "tokenizer_path": _copy_model(i["tokenizer_path"], t / "tok", replace={
            "chat_template.jinja": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}),
        "preferences": _write(t / "prefs.jsonl", '{"chosen": "good", "rejected": "bad"}\n')},
     "prefs.jsonl: example 0: empty prompt: with use_chat_template a reply needs the user turn"),
    ("builtin_tokenizer_without_chat_template", lambda t, i: _scratch(use_chat_template=True),
     "--config.use_chat_template=True but the tokenizer of the built-in task has no chat "
     "template"),
    ("missing_tokenizer_config", lambda t, i: {"tokenizer_path": _copy_model(
        i["tokenizer_path"], t / "tok", drop="tokenizer_config.json")},
     "tok/tokenizer_config.json: missing"),
    ("truncated_reward_safetensors_before_sft", lambda t, i: {
        **_one_sft_example(t),
        "reward_path": _truncated(i["reward_path"], t / "rm", "model.safetensors")},
     "corrupt or unreadable safetensors"),
    ("overlong_sft_completion", lambda t, i: {"sft_data": _long_sft(t), "sft.max_len": 16},
     "set --config.sft.max_len (at most the model's positions, 16"),
    ("overlong_preference_before_sft", lambda t, i: {
        **_one_sft_example(t), "preferences": _long_prefs(t), "reward_path": "", "sft.max_len": 16,
        "reward.max_len": 16}, "or --config.reward.drop_overlong=True"),
    ("workdir_is_a_file", lambda t, i: {"__workdir_file": True}, "FileExistsError"),
]


def _argv(workdir, overrides: dict) -> list[str]:
  config = overrides.pop("__config", "experiments/configs/default.py:smoke")
  return (["rlhf", *([f"--config={config}"] if config else []), f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def _run_cli(argv: list[str], monkeypatch, main=rlhf_main.main) -> int:
  """What `common.run(main)` does under `app.run`: parse the flags, then the guarded main."""
  # A fresh process's flags: the --config.* override flags are defined by each parse.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  monkeypatch.setattr(sys, "argv", argv)   # ml_collections reads config overrides from sys.argv
  try:
    common.parse_flags(argv)
    common.guard(main)(argv)
  except SystemExit as e:
    return e.code
  return 0


def _earlier_run(workdir) -> None:
  """Files an earlier run left in the workdir (none of them a stage's inputs)."""
  for rel, content in (("notes.txt", "the earlier run\n"), ("sft/earlier.bin", b"\x00\x01"),
                       ("reward/earlier.bin", b"\x02"), ("ppo/metrics.jsonl", '{"step": 1}\n')):
    os.makedirs(os.path.dirname(os.path.join(workdir, rel)) or workdir, exist_ok=True)
    _write(os.path.join(workdir, rel), content)


def _hashes(workdir) -> dict[str, str]:
  """sha256 of every file under `workdir` (or of `workdir` itself when it is a file)."""
  if os.path.isfile(workdir):
    return {".": hashlib.sha256(open(workdir, "rb").read()).hexdigest()}
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _new(workdir, before: dict[str, str]) -> list[str]:
  """Files and empty directories that are new since `before`, logs excepted."""
  if os.path.isfile(workdir):
    return []
  out = []
  for root, dirs, files in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if any(part in LOGS for part in rel.split(os.sep)):
      continue
    out += [p for p in (os.path.normpath(os.path.join(rel, f)) for f in files if f not in LOGS)
            if p not in before]
    out += [os.path.join(rel, d) for d in dirs if d not in LOGS and not os.listdir(
        os.path.join(root, d))]
  return sorted(out)


def assert_one_error(code: int, err: str, expected: str) -> None:
  error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 2, err[-2000:]
  assert len(error_lines) == 1 and expected in error_lines[0], err[-2000:]
  assert "Traceback" not in err


@pytest.mark.parametrize("case, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, setup, expected, inputs, tmp_path, capsys,
                                         monkeypatch):
  workdir = tmp_path / "work"
  overrides = {**inputs, **tiny_ppo.ppo_overrides(2), "sft.max_len": 16, "reward.max_len": 16}
  overrides.update(setup(tmp_path, inputs))
  if overrides.pop("__workdir_file", False):
    _write(workdir, "a file where the workdir should be\n")
  else:
    _earlier_run(workdir)
  before = _hashes(workdir)
  capsys.readouterr()
  code = _run_cli(_argv(workdir, overrides), monkeypatch)
  assert_one_error(code, capsys.readouterr().err, expected)
  after = _hashes(workdir)
  assert {k: after.get(k) for k in before} == before, case
  assert _new(workdir, before) == [], case


def _raises(exc: BaseException):
  def main(argv):
    del argv
    raise exc
  return main


@pytest.mark.parametrize("exc, code, expected", [
    (OSError(28, "No space left on device"), 2, "error: OSError: [Errno 28] No space left"),
    (TypeError("unsupported operand"), 1,
     "error: TypeError: unsupported operand (RLHF_JAX_TRACEBACK"),
    (ZeroDivisionError("division by zero"), 1, "error: ZeroDivisionError: division by zero"),
    (RuntimeError("orbax: step 7\nis incomplete"), 1,
     "error: RuntimeError: orbax: step 7 is incomplete"),
    (ModuleNotFoundError("No module named 'judge'"), 2, "error: ModuleNotFoundError: No module"),
    (KeyboardInterrupt(), 130, "error: interrupted (KeyboardInterrupt)"),
], ids=["oserror", "typeerror", "zerodivision", "multiline", "import", "ctrl_c"])
def test_every_failure_is_one_error_line(exc, code, expected, capsys, monkeypatch):
  monkeypatch.delenv("RLHF_JAX_TRACEBACK", raising=False)
  with pytest.raises(SystemExit) as e:
    common.guard(_raises(exc))([])
  err = capsys.readouterr().err
  assert e.value.code == code
  assert err.count("\n") == 1 and err.startswith(expected), err


def test_traceback_on_request(monkeypatch):
  monkeypatch.setenv("RLHF_JAX_TRACEBACK", "1")
  with pytest.raises(TypeError, match="unsupported"):
    common.guard(_raises(TypeError("unsupported operand")))([])


def test_reward_model_without_held_out_pairs_is_saved(inputs, tmp_path):
  """reward.eval_fraction=0 trained, then crashed on the missing held-out accuracy before
  saving: the reward model was lost."""
  pairs = [{"prompt": "good", "chosen": "nice great", "rejected": "awful poor"}] * 16
  config = pipeline.ExperimentConfig(
      task=pipeline.TaskConfig(name=""), tokenizer_path=inputs["tokenizer_path"],
      preferences=data.write_jsonl(str(tmp_path / "prefs.jsonl"), pairs),
      reward=RewardConfig(batch_size=8, max_len=8, eval_fraction=0.0))
  paths = pipeline.Paths(str(tmp_path / "work"))
  out = pipeline.run_reward(config, paths, inputs["policy_path"])
  assert isinstance(models.from_pretrained(out), models.ScalarModel)


def test_ppo_without_eval_prompts_evaluates_on_training_prompts(tmp_path):
  """The PPO stage's docstring command gives no eval prompts; it failed with "no prompts to
  encode"."""
  tok = data.build_tokenizer(tiny_ppo.WORDS, str(tmp_path / "tok"))
  cfg = tiny_ppo.model_cfg(tok)
  prompts = tiny_ppo.prompts()
  trainer = PPOTrainer(
      PPOTrainerConfig(batch_size=8, max_prompt_len=4, sampling=SamplingConfig(max_new_tokens=4),
                       num_eval_prompts=8, max_steps=1),
      models.CausalLM(cfg, rngs=nnx.Rngs(0)), tok, prompts, [], reward_fn=tiny_ppo.target_share,
      reward_params=None, value_model=models.ScalarModel(cfg, rngs=nnx.Rngs(1)))
  want = data.encode_prompts(tok, prompts[:8], 4)
  np.testing.assert_array_equal(trainer.evaluator.ids, want.ids)
  np.testing.assert_array_equal(trainer.evaluator.mask, want.mask)


def test_stage_mains_check_before_they_work(inputs, tmp_path, tmp_path_factory):
  """Each stage's own main runs the preflight checks first (subprocesses: a process's flags
  hold one main)."""
  cases = [
      ("experiments.sft", {**SCRATCH, "sft.max_len": 65}, "--config.sft.max_len=65 exceeds"),
      ("experiments.reward_model", {**inputs, "reward.max_len": 17},
       "--config.reward.max_len=17 exceeds the model's positions: 16"),
      ("experiments.ppo", {**inputs, "reward_path": inputs["policy_path"]},
       "is a causal LM, not a reward model"),
  ]
  env = tiny_ppo.env(tiny_ppo.cache_dir(tmp_path_factory))
  procs = []
  for i, (module, overrides, _) in enumerate(cases):
    workdir = tmp_path / f"work{i}"
    _earlier_run(workdir)
    procs.append((workdir, _hashes(workdir), subprocess.Popen(
        tiny_ppo.command(str(workdir), overrides, module), cwd=tiny_ppo.ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for (workdir, before, proc), (module, _, expected) in zip(procs, cases):
    _, err = proc.communicate(timeout=300)
    assert_one_error(proc.returncode, err, expected)
    assert _hashes(workdir) == before, module
