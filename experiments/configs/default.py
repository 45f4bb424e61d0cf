"""The embedded default RLHF run, and variants.

  python -m experiments.rlhf --workdir=runs/default                       # everything, built-in task
  python -m experiments.rlhf --config=experiments/configs/default.py:smoke --workdir=/tmp/w
  python -m experiments.rlhf --workdir=w --config.policy_path=/ckpt/sft \
      --config.reward_path=/ckpt/rm --config.prompts=/data/prompts.jsonl   # your own models/data

Variants: "default" (offline, 2 CPU cores, a few minutes), "smoke" (seconds; for tests),
"grpo" (default with group-relative advantages, no critic).

The built-in task (`task="default"`): a templated review/diary corpus from real English words; a
simulated human labeler (the VADER lexicon, 7,500 human-rated words) prefers the more positive of
two completions with Bradley-Terry noise; the reward model learns only from those pairs; the
labeler's own score is logged as `gold_score`, never shown to the policy.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "default"
  c = config_dict.ConfigDict()
  c.seed = 0
  # Mesh over (data, fsdp, tensor); one -1 takes the remaining devices.
  c.mesh_shape = (-1, 1, 1)

  # Data. task="default" builds the offline task into <workdir>/data; set it to "" and give paths
  # to run on your own data (JSONL / text / parquet / datasets-on-disk).
  c.task = "default"
  c.prompts = ""
  c.eval_prompts = ""
  c.sft_data = ""
  c.preferences = ""
  c.use_chat_template = False

  # Models. Empty paths: the stage trains one (SFT from scratch with `model`, the reward model
  # from the SFT policy's trunk). Given paths are local Hugging Face checkpoints.
  c.policy_path = ""
  c.reward_path = ""
  c.tokenizer_path = ""   # default: the policy checkpoint's directory (or the built-in task's)
  c.model = config_dict.ConfigDict(dict(
      model_type="llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=32, intermediate_size=384, max_position_embeddings=64))
  c.dtype = "float32"

  c.sft = config_dict.ConfigDict(dict(
      num_examples=6000, batch_size=64, epochs=2, max_len=32, learning_rate=3e-3,
      warmup_steps=20, eval_fraction=0.05))
  c.reward = config_dict.ConfigDict(dict(
      num_pairs=10000, batch_size=64, epochs=3, max_len=32, learning_rate=1e-3,
      warmup_steps=20, eval_fraction=0.1, center_coef=0.0,
      label_temperature=0.1))
  c.ppo = config_dict.ConfigDict(dict(
      num_prompts=4096, batch_size=64, group_size=1, max_prompt_len=12, max_new_tokens=12,
      temperature=1.0, top_k=0, top_p=1.0, decode_layout="auto", max_steps=60,
      reward_threshold=config_dict.placeholder(float), eval_every=10, num_eval_prompts=128,
      normalize_reward=True, missing_eos_penalty=1.0, whiten_scores=False,
      policy_loss="ppo", clip_eps=0.2, value_loss="clipped", value_clip_eps=0.2,
      advantage="gae", gamma=1.0, lam=0.95, critic="separate", ppo_epochs=4,
      num_minibatches=4, vf_coef=0.1, ent_coef=0.0, whiten_advantages=True,
      kl_estimator="k1", kl_in_reward=True, kl_coef=0.1, kl_controller="fixed",
      kl_target=6.0, kl_horizon=10000, learning_rate=2e-4,
      max_grad_norm=1.0, lr_schedule="constant",
      # Checkpoints in <workdir>/ppo/checkpoints; a rerun resumes from the newest.
      checkpoint_every=10, keep_checkpoints=3, max_nonfinite_iterations=3))

  if variant == "default":
    pass
  elif variant == "smoke":
    c.model.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64)
    c.sft.update(num_examples=256, epochs=1, batch_size=32)
    c.reward.update(num_pairs=256, epochs=1, batch_size=32)
    c.ppo.update(num_prompts=128, batch_size=16, max_steps=3, eval_every=2, num_eval_prompts=16,
                 num_minibatches=2)
  elif variant == "grpo":
    c.ppo.update(group_size=4, batch_size=16, advantage="grpo", critic="none",
                 policy_loss="grpo", whiten_advantages=False, kl_in_reward=False,
                 kl_estimator="k3", num_minibatches=4)
  else:
    raise ValueError(f"unknown config variant {variant!r} (default, smoke, grpo)")
  return c
