"""Malformed inputs through the command line (`experiments.rlhf`, flags parsed as `app.run` does):
each ends with exit status 2 and one `error:` line naming the problem, no traceback, and nothing
written to the workdir beyond logs.

The mains run in-process (one interpreter for the whole table) rather than as subprocesses,
which would spend ~10 s each on imports.
"""

import json
import os
import shutil
import sys

import jax
import pytest
from absl import flags
from flax import nnx

from experiments import common
from experiments import rlhf as rlhf_main
from rlhf_jax import checkpointing, data, models, ppo
from rlhf_jax.optim import OptimConfig, make_optimizer

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
    ("mesh_vs_devices", lambda t, i: {"mesh_shape": "(3,1,1)"}, "needs 3 devices, but 8 are available"),
    ("sft_example_without_completion", lambda t, i: {"sft_data": _write(
        t / "sft.jsonl", '{"prompt": "good"}\n')}, "'completion'"),
    ("preference_without_rejected", lambda t, i: {"reward_path": "", "preferences": _write(
        t / "prefs.jsonl", '{"prompt": "a", "chosen": "good"}\n')}, "'rejected'"),
    ("other_runs_checkpoint", lambda t, i: _other_runs_checkpoint(t / "work"),
     "does not match this run"),
]


def _argv(workdir, overrides: dict) -> list[str]:
  config = overrides.pop("__config", "experiments/configs/default.py:smoke")
  return (["rlhf", *([f"--config={config}"] if config else []), f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def _run_cli(argv: list[str], monkeypatch) -> int:
  """What `common.run(main)` does under `app.run`: parse the flags, then the guarded main."""
  # A fresh process's flags: the --config.* override flags are defined by each parse.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  monkeypatch.setattr(sys, "argv", argv)   # ml_collections reads config overrides from sys.argv
  try:
    common.parse_flags(argv)
    common.guard(rlhf_main.main)(argv)
  except SystemExit as e:
    return e.code
  return 0


def _written(workdir) -> list[str]:
  if not os.path.isdir(workdir):
    return []
  out = []
  for root, dirs, files in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if any(part in LOGS for part in rel.split(os.sep)):
      continue
    out += [os.path.join(rel, f) for f in files if f not in LOGS]
    out += [os.path.join(rel, d) for d in dirs if d not in LOGS and not os.listdir(
        os.path.join(root, d))]
  return sorted(out)


@pytest.mark.parametrize("case, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, setup, expected, inputs, tmp_path, capsys,
                                         monkeypatch):
  workdir = tmp_path / "work"
  overrides = {**inputs, **tiny_ppo.ppo_overrides(2)}
  overrides.update(setup(tmp_path, inputs))
  before = _written(workdir)
  capsys.readouterr()
  code = _run_cli(_argv(workdir, overrides), monkeypatch)
  err = capsys.readouterr().err
  error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 2, err[-2000:]
  assert len(error_lines) == 1 and expected in error_lines[0], err[-2000:]
  assert "Traceback" not in err
  assert _written(workdir) == before, case
