"""FLOP counts of one PPO iteration: TRL's formula, which gives the `mfu` both frameworks report,
and the FLOPs rlhf_jax's programs execute, which gives `mfu_executed`."""


def trl_flops(p: dict) -> dict:
  """Model FLOPs per iteration exactly as TRL's baseline counts them (trl_ppo_cpu.md).

  Matmul FLOPs at 2 per multiply-add, backward = 2 x forward, causal attention over t+1 keys:
    fwd_lm     = 24 L d^2 T + 2 L d T (T+1) + 2 d V T
    fwd_scalar = 24 L d^2 T + 2 L d T (T+1) + 2 d T
    gen        = 24 L d^2 (T-1) + 2 L d (T-1) T + 2 d V R
    iteration  = B [gen + fwd_lm + 2 fwd_scalar + 3 E (fwd_lm + fwd_scalar)]
  """
  l, d, v = p["n_layer"], p["n_embd"], p["vocab"]
  pl, r, b, e = p["prompt_len"], p["response_len"], p["batch"], p["ppo_epochs"]
  t = pl + r
  dense = 24 * l * d * d
  backbone = dense * t + 2 * l * d * t * (t + 1)
  fwd_lm = backbone + 2 * d * v * t
  fwd_scalar = backbone + 2 * d * t
  gen = dense * (t - 1) + 2 * l * d * (t - 1) * t + 2 * d * v * r
  per_iter = {"generation": b * gen, "ref_fwd": b * fwd_lm, "value_fwd": b * fwd_scalar,
              "reward_fwd": b * fwd_scalar, "ppo_train_fwd_bwd": b * 3 * e * (fwd_lm + fwd_scalar)}
  return {"per_iteration": dict(per_iter, total=sum(per_iter.values())),
          "generation_batch": b * gen, "fwd_bwd_batch": 3 * b * fwd_lm}


def executed_flops(p: dict, critic: str) -> dict:
  """Matmul FLOPs the rlhf_jax programs run for the same workload (same counting rules).

  Differences from `trl_flops`: attention scores every key slot of the buffer (4 L d T S per
  sequence, masked afterwards, S = T); scoring and training apply the LM head to the R positions
  that predict completion tokens only, and their last block computes queries, attention and MLP
  (20 d^2 + 4 d S per row) for those R rows only; the reward head reads one position; generation
  is a prefill with the LM head and the last block's queries at its last position, then R - 1
  decode steps, attending over a cache of S = T - 1 slots. A shared critic reuses the policy
  trunk: no value backbone in training.
  """
  l, d, v = p["n_layer"], p["n_embd"], p["vocab"]
  pl, r, b, e = p["prompt_len"], p["response_len"], p["batch"], p["ppo_epochs"]
  t = pl + r
  dense = 24 * l * d * d
  lm = 2 * d * v
  backbone = dense * t + 4 * l * d * t * t
  gen = (dense * (t - 1) + lm * r + 4 * l * d * (t - 1) * (t - 1)
         - (20 * d * d + 4 * d * (t - 1)) * (pl - 1))
  kept = backbone - (20 * d * d + 4 * d * t) * (t - r)
  policy_fwd = kept + lm * r
  value_fwd = kept + 2 * d * r
  train_fwd = policy_fwd + (value_fwd if critic == "separate" else 2 * d * r)
  per_iter = {"generation": b * gen, "ref_fwd": b * policy_fwd, "value_fwd": b * value_fwd,
              "reward_fwd": b * (backbone + 2 * d), "ppo_train_fwd_bwd": b * 3 * e * train_fwd}
  return {"per_iteration": dict(per_iter, total=sum(per_iter.values())),
          "generation_batch": b * gen, "fwd_bwd_batch": 3 * b * (backbone + lm * (t - 1))}


def gflops(flops, seconds):
  """GFLOP/s; None when there is no time to divide by."""
  return round(flops / seconds / 1e9, 2) if seconds else None


def mfu(flops, seconds, peak):
  """Achieved / peak, the peak in GFLOP/s; None without a time or a peak."""
  return round(flops / seconds / 1e9 / peak, 4) if seconds and peak else None

