"""One reward-model epoch on preference pairs with HH-like lengths: fixed padding vs length buckets.

The pairs are synthetic but shaped like Anthropic hh-rlhf's (its harmless-base test split: 2,312
pairs, dialogue lengths median 158 tokens, p99 816, max 1,313): each pair's dialogue length is
log-normal (median `--median`, log-sd `--sigma`, clipped to [8, `--max-tokens`]); its last reply
(the chosen completion) takes a uniform 10-40 % of it, the rejected reply a log-normal multiple of
that, and the prompt the rest. Words are drawn from the default task's word-level vocabulary, so
a word is a token. Each mode trains a fresh random-init ScalarModel for one epoch through the real
`trainers.reward.train_reward_model` (tokenisation, the plan, one compiled step per width):

  fixed    length_buckets=1: every batch max_len wide (what the trainers did before)
  trim     length_buckets=K: the plain shuffle's batches, each cut to the least width holding it
  bucket   length_buckets=K, group_by_length: batches drawn from rows of one width

Reported per mode: the epoch's padding fraction (pad slots / all slots of the attention masks),
its time (real tokens / fit's tokens_per_s: the steps only, compilation excluded), the whole
call's wall time (encoding and compilations included), the widths compiled and the mean loss.

  python bench/bucketing.py                              # the figures in bench/README.md
  python bench/bucketing.py --pairs 2312 --modes fixed,bucket --out /tmp/b.json   # hh-rlhf size
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

MODES = ("fixed", "trim", "bucket")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--pairs", type=int, default=256, help="preference pairs (one epoch)")
  ap.add_argument("--median", type=float, default=160.0, help="median dialogue length (tokens)")
  ap.add_argument("--sigma", type=float, default=0.7, help="log-sd of the dialogue length")
  ap.add_argument("--max-tokens", type=int, default=1300, help="longest dialogue (tokens)")
  ap.add_argument("--batch", type=int, default=8, help="pairs per step")
  ap.add_argument("--micro-batch", type=int, default=4,
                  help="pairs per forward/backward (micro_batch_size; bounds the memory)")
  ap.add_argument("--buckets", type=int, default=8, help="length_buckets of trim and bucket")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--width", type=int, default=64, help="hidden size (head_dim 16)")
  ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, run in this order")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None, help="also write the JSON result here")
  args = ap.parse_args(argv)
  for name in ("pairs", "batch", "micro_batch", "buckets", "layers", "max_tokens"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.width < 16 or args.width % 16:
    ap.error(f"--width must be a positive multiple of 16, got {args.width}")
  if args.max_tokens < 8 or args.median <= 0 or args.sigma < 0:
    ap.error("--max-tokens must be >= 8, --median > 0 and --sigma >= 0")
  if args.batch % args.micro_batch:
    ap.error(f"--micro-batch must divide --batch ({args.batch}), got {args.micro_batch}")
  if args.pairs < args.batch:
    ap.error(f"--pairs must be >= --batch ({args.batch}), got {args.pairs}")
  args.modes = tuple(args.modes.split(","))
  unknown = sorted(set(args.modes) - set(MODES))
  if unknown or not args.modes:
    ap.error(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {unknown}")
  return args


def pair_lengths(n: int, median: float, sigma: float, max_tokens: int,
                 seed: int) -> np.ndarray:
  """int [n, 3] (prompt, chosen, rejected) word counts; prompt + the longer reply + EOS stays
  within max_tokens."""
  rng = np.random.default_rng(seed)
  total = np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), 8, max_tokens)
  chosen = np.maximum(np.round(total * rng.uniform(0.1, 0.4, n)), 1)
  rejected = np.maximum(np.round(chosen * np.exp(rng.normal(0.0, 0.3, n))), 1)
  prompt = np.maximum(total - chosen, 1)
  # the longer side, with its EOS, within max_tokens
  over = np.maximum(prompt + np.maximum(chosen, rejected) + 1 - max_tokens, 0)
  prompt = np.maximum(prompt - over, 1)
  chosen = np.minimum(chosen, max_tokens - 1 - prompt)
  rejected = np.minimum(rejected, max_tokens - 1 - prompt)
  return np.stack([prompt, chosen, rejected], axis=1).astype(int)


def make_pairs(lengths: np.ndarray, words: list[str], seed: int) -> list:
  from rlhf_jax import data
  rng = np.random.default_rng([seed, 1])
  text = lambda k: " ".join(rng.choice(words, int(k)))
  return [data.PreferencePair(prompt=text(p), chosen=text(c), rejected=text(r))
          for p, c, r in lengths]


def run_mode(mode: str, args: argparse.Namespace, tokenizer, pairs, max_len: int) -> dict:
  """One epoch of `mode` from a fresh model; the figures of the module docstring."""
  from flax import nnx
  from rlhf_jax import models, optim
  from rlhf_jax.trainers import reward
  cfg = reward.RewardConfig(
      batch_size=args.batch, micro_batch_size=args.micro_batch, epochs=1, max_len=max_len, eval_fraction=0.0, seed=args.seed,
      log_every=10**9, length_buckets=1 if mode == "fixed" else args.buckets,
      group_by_length=mode == "bucket", optim=optim.OptimConfig(learning_rate=1e-3))
  model_cfg = models.DecoderConfig(
      model_type="llama", vocab_size=len(tokenizer), hidden_size=args.width,
      num_layers=args.layers, num_heads=args.width // 16, num_kv_heads=args.width // 16,
      head_dim=16, intermediate_size=4 * args.width, max_position_embeddings=max_len,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
  model = models.ScalarModel(model_cfg, rngs=nnx.Rngs(args.seed))
  start = time.perf_counter()
  _, history, _ = reward.train_reward_model(model, tokenizer, pairs, cfg)
  call_s = time.perf_counter() - start
  width = np.array([h["batch_width"] for h in history])
  pad = np.array([h["padding_fraction"] for h in history])
  # slots per step: 2 sides x batch x width; one logging window, so one tokens_per_s
  real = float(np.sum((1.0 - pad) * 2 * args.batch * width))
  epoch_s = real / history[-1]["tokens_per_s"]
  return {"steps": len(history), "padding_fraction": round(float(np.sum(pad * width)
                                                                 / np.sum(width)), 4),
          "epoch_s": round(epoch_s, 2), "call_s": round(call_s, 2),
          "real_tokens_per_s": round(history[-1]["tokens_per_s"], 1),
          "widths": sorted({int(w) for w in width}),
          "mean_loss": round(float(np.mean([h["loss"] for h in history])), 4)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # this checkout's
  from rlhf_jax import data
  lengths = pair_lengths(args.pairs, args.median, args.sigma, args.max_tokens, args.seed)
  words = data.vocabulary()
  pairs = make_pairs(lengths, words, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = data.build_tokenizer(words, tmp)
    # row length = prompt + longer reply + EOS (+ any special tokens the tokenizer adds)
    extra = len(tokenizer("x").input_ids) - 1
    max_len = int(args.max_tokens + extra)
    dialogue = lengths[:, 0] + lengths[:, 1:].max(axis=1) + 1 + extra
    res = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "max_len": max_len,
           "row_length": {"median": float(np.median(dialogue)),
                          "p99": float(np.percentile(dialogue, 99)),
                          "max": int(dialogue.max()), "mean": round(float(dialogue.mean()), 1)},
           "modes": {}}
    for mode in args.modes:
      res["modes"][mode] = run_mode(mode, args, tokenizer, pairs, max_len)
      print(f"{mode:>6}: {res['modes'][mode]}", file=sys.stderr, flush=True)
  if "fixed" in res["modes"]:
    base = res["modes"]["fixed"]["epoch_s"]
    res["speedup_over_fixed"] = {m: round(base / r["epoch_s"], 2)
                                 for m, r in res["modes"].items() if m != "fixed"}
  line = json.dumps(res)
  if args.out:
    pathlib.Path(args.out).write_text(line + "\n")
  print(line)
  return res


if __name__ == "__main__":
  main()
