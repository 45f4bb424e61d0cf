"""The PPO workload both frameworks run (TRL's presets, shared/reference/trl_ppo_cpu.md), and the
two helpers every bench module uses: progress logging and a median that tolerates no samples."""

import statistics
import sys

PRESETS = {
    "tiny": dict(vocab=8192, n_layer=4, n_embd=256, n_head=4, n_positions=256,
                 prompt_len=32, response_len=32, batch=64, mini_batch=16, ppo_epochs=4),
    # GPT-2 124M.
    "small": dict(vocab=50257, n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                  prompt_len=64, response_len=64, batch=16, mini_batch=4, ppo_epochs=1),
}
# Preset fields a flag may shrink; TRL's script takes the same flags, so both run one workload.
OVERRIDES = ("batch", "mini_batch", "ppo_epochs", "prompt_len", "response_len", "n_layer")
# Prompts are drawn from [FIRST_ID, V), so they never contain pad or eos.
PAD_ID, EOS_ID, FIRST_ID = 0, 1, 3
TEMPERATURE = 0.7


def workload(args) -> dict:
  """The preset named by `args.preset`, with the OVERRIDES flags that were given applied."""
  p = dict(PRESETS[args.preset])
  p.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
  return p


def log(msg: str) -> None:
  """Progress goes to stderr: stdout's last line is the JSON result the parent reads."""
  print(msg, file=sys.stderr, flush=True)


def median(xs):
  return statistics.median(xs) if xs else None
