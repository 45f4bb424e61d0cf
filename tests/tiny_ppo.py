"""Tiny PPO runs for the checkpoint and fault tests: a trainer built in-process, or the PPO stage
main (`python -m experiments.ppo`) in a subprocess on tiny Hugging Face checkpoints.

Subprocesses share a persistent compilation cache, so only the first one compiles; a restart
costs interpreter and import time, not XLA time.
"""

import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data, models, sharding
from rlhf_jax.metrics import MetricsWriter, read_jsonl
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "good bad fine great awful nice ok poor . !".split()
TIMING_KEYS = ("iteration_s", "tokens_per_s")


def cache_dir(tmp_path_factory) -> str:
  """One persistent compilation cache per test session, shared by all modules, both xdist
  workers (each has its own base temp below the session's) and subprocesses."""
  base = tmp_path_factory.getbasetemp()
  return str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.build_tokenizer(WORDS, str(tmp_path_factory.mktemp("tok")))


def model_cfg(tokenizer, hidden_size: int = 16) -> models.DecoderConfig:
  return models.DecoderConfig(
      model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=1,
      num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32, max_position_embeddings=16,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def prompts(n: int = 40) -> list[str]:
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(WORDS[:8], 3)) for _ in range(n)]


def target_share(params, ro):
  """A known reward with spread: the share of completion tokens equal to id 5."""
  del params
  m = ro.completion_mask
  return ((ro.completion_ids == 5) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def trainer(tokenizer, workdir: pathlib.Path, max_steps: int, reward_fn=target_share,
            **cfg_overrides) -> tuple[PPOTrainer, MetricsWriter]:
  """An in-process PPOTrainer on a (2, 2, 2) mesh, checkpointing every step under `workdir`."""
  cfg = PPOTrainerConfig(**{
      **dict(batch_size=8, max_prompt_len=4, sampling=SamplingConfig(max_new_tokens=4),
             max_steps=max_steps, eval_every=2, num_eval_prompts=8, checkpoint_every=1, seed=3,
             ppo_epochs=1, num_minibatches=2,
             optim=OptimConfig(learning_rate=1e-2, schedule="constant")),
      **cfg_overrides})
  mcfg = model_cfg(tokenizer)
  writer = MetricsWriter(str(workdir), tensorboard=False)
  p = prompts()
  return PPOTrainer(
      cfg, models.CausalLM(mcfg, rngs=nnx.Rngs(0)), tokenizer, p, p[:8],
      reward_fn=reward_fn, reward_params=None,
      value_model=models.ScalarModel(mcfg, rngs=nnx.Rngs(1)),
      mesh=sharding.make_mesh((2, 2, 2)), writer=writer,
      checkpoint_dir=str(workdir / "ckpt")), writer


def write_inputs(root: pathlib.Path) -> dict[str, str]:
  """Tokenizer, random-init policy and reward checkpoints, and prompt files under `root`;
  returns the config overrides naming them."""
  tok = data.build_tokenizer(WORDS, str(root / "tok"))
  cfg = model_cfg(tok)
  for name, cls, seed in (("policy", models.CausalLM, 0), ("reward", models.ScalarModel, 1)):
    kwargs = {"head_std": 0.5} if cls is models.ScalarModel else {}
    models.save_pretrained(cls(cfg, rngs=nnx.Rngs(seed), **kwargs), str(root / name))
    tok.save_pretrained(str(root / name))
  data.write_jsonl(str(root / "prompts.jsonl"), [{"prompt": p} for p in prompts(64)])
  return {"task.name": "", "policy_path": str(root / "policy"),
          "reward_path": str(root / "reward"), "tokenizer_path": str(root / "tok"),
          "prompts": str(root / "prompts.jsonl"), "eval_prompts": str(root / "prompts.jsonl")}


def ppo_overrides(max_steps: int, **extra) -> dict[str, object]:
  """A PPO stage of ~0.1 s per iteration: batch 8, 4+4 tokens, one epoch of two minibatches."""
  return {"ppo.batch_size": 8, "ppo.max_prompt_len": 4, "ppo.sampling.max_new_tokens": 4,
          "ppo.ppo_epochs": 1, "ppo.num_minibatches": 2, "ppo.num_eval_prompts": 8,
          "ppo.eval_every": 2, "ppo.max_steps": max_steps, "ppo.checkpoint_every": 1, **extra}


def env(cache_dir: str, num_devices: int = 2, xla_optimize: bool = False) -> dict[str, str]:
  """The subprocess environment: CPU with `num_devices` devices and this process's other XLA
  flags (conftest), the shared compilation cache, and no torch (tests/torchless: as installed
  by the README's main command).

  xla_optimize: drop the tests' `--xla_backend_optimization_level` so that XLA compiles at its
    default level, as a user's run does.
  """
  e = dict(os.environ)
  dropped = ("--xla_force_host_platform_device_count",
             *(("--xla_backend_optimization_level",) if xla_optimize else ()))
  flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
  e.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"),
                                                             str(ROOT)]),
           XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={num_devices}", *flags]),
           JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return e


def command(workdir: str, overrides: dict[str, object], module: str = "experiments.ppo"):
  return ([sys.executable, "-m", module, f"--workdir={workdir}",
           "--config=experiments/configs/default.py:smoke"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def start(workdir: str, overrides: dict[str, object], cache_dir: str, log_path: str,
          num_devices: int = 2, flags: tuple[str, ...] = ()) -> subprocess.Popen:
  """Starts the PPO stage in the background, its output appended to `log_path` (a file, not a
  pipe, so a chatty child never blocks on a full pipe)."""
  with open(log_path, "a") as log:
    return subprocess.Popen(command(workdir, overrides) + list(flags), cwd=ROOT,
                            env=env(cache_dir, num_devices), stdout=log,
                            stderr=subprocess.STDOUT)


def run(workdir: str, overrides: dict[str, object], cache_dir: str, timeout: float = 180,
        num_devices: int = 2) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, overrides), cwd=ROOT, env=env(cache_dir, num_devices),
                        capture_output=True, text=True, timeout=timeout)


def without_timing(records: list[dict]) -> list[dict]:
  """Records without the wall-clock keys, which no two runs share."""
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def stage_metrics(workdir: str) -> list[dict]:
  """The PPO stage's metrics.jsonl, without timing keys."""
  return without_timing(read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl")))


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoints (Orbax writes into a temporary name and renames when done)."""
  d = os.path.join(workdir, "ppo", "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def save_in_flight(workdir: str) -> bool:
  """Whether a checkpoint is being written (its temporary directory exists)."""
  d = os.path.join(workdir, "ppo", "checkpoints")
  return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 120,
             poll_s: float = 0.01) -> None:
  """Polls `condition` while `proc` runs; fails if it ends first or the time runs out."""
  deadline = time.time() + timeout_s
  while not condition():
    assert proc.poll() is None, f"the run ended early with status {proc.returncode}"
    assert time.time() < deadline, "timed out"
    time.sleep(poll_s)
