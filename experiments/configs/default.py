"""The embedded default RLHF run, and variants.

  python -m experiments.rlhf --workdir=runs/default                       # everything, built-in task
  python -m experiments.rlhf --config=experiments/configs/default.py:smoke --workdir=/tmp/w
  python -m experiments.rlhf --workdir=w --config.policy_path=/ckpt/sft \
      --config.reward_path=/ckpt/rm --config.prompts=/data/prompts.jsonl   # your own models/data

The config is the ConfigDict mirror of `rlhf_jax.pipeline.ExperimentConfig`: every field of its
dataclasses is a flag under the same path (`--config.ppo.kl.init_coef=0.2`,
`--config.ppo.sampling.temperature=0.7`, `--config.ppo.optim.learning_rate=1e-4`); the field
docs are in those dataclasses. This file sets the default run's values on that tree.

Variants: "default" (offline, 2 CPU cores, a few minutes), "smoke" (seconds; for tests),
"grpo" (default with group-relative advantages, no critic), "grpo_math" (SFT then GRPO on the
built-in arithmetic task with an exact-match reward, no reward model), "dpo" (SFT then DPO on the
preference pairs instead of reward model + PPO), "lora" (default with LoRA PPO: rank-8 adapters
and a trained copy of the output head, the reference being the adapters-off base), "hacking" (default without the KL
penalty and with a larger learning rate: the policy games the reward model, the gold score falls
and the reward-hacking monitor fires; the README's lesson).

The built-in task (`task.name="default"`): a templated review/diary corpus from real English words;
a simulated human labeler (the VADER lexicon, 7,500 human-rated words) prefers the more positive
of two completions with Bradley-Terry noise; the reward model learns only from those pairs; the
labeler's own score is logged as `gold_score`, never shown to the policy.
"""

from ml_collections import config_dict

from rlhf_jax.config_tree import to_config_dict
from rlhf_jax.pipeline import ExperimentConfig


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "default"
  c = to_config_dict(ExperimentConfig())
  c.lock()   # a misspelt field below fails here, not silently as a new key
  c.task.update(name="default", seed=0, num_sft=6000, num_pairs=10000, num_prompts=4096,
                label_temperature=0.1)
  c.mesh_shape = (-1, 1, 1)
  c.model.update(model_type="llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, intermediate_size=384, max_position_embeddings=64,
                 dtype="float32")

  c.sft.update(batch_size=64, epochs=2, max_len=32, eval_fraction=0.05, seed=0)
  c.sft.optim.update(learning_rate=3e-3, schedule="cosine", warmup_steps=20)
  c.reward.update(batch_size=64, epochs=3, max_len=32, eval_fraction=0.1, center_coef=0.0,
                  seed=0)
  c.reward.optim.update(learning_rate=1e-3, schedule="cosine", warmup_steps=20)

  p = c.ppo
  p.update(batch_size=64, group_size=1, max_prompt_len=12, max_steps=60, eval_every=10,
           num_eval_prompts=128, normalize_reward=True, missing_eos_penalty=1.0,
           whiten_scores=False, critic="separate", ppo_epochs=4, num_minibatches=4, vf_coef=0.1,
           ent_coef=0.0, whiten_advantages=True, seed=0,
           # Checkpoints in <workdir>/ppo/checkpoints; a rerun resumes from the newest.
           checkpoint_every=10, keep_checkpoints=3, max_nonfinite_iterations=3)
  p.sampling.update(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
  p.policy_loss.update(name="ppo", clip_eps=0.2)
  p.value_loss.update(name="clipped", clip_eps=0.2)
  p.advantage.update(estimator="gae", gamma=1.0, lam=0.95)
  p.kl.update(estimator="k1", in_reward=True, init_coef=0.1, controller="fixed", target=6.0,
              horizon=10000)
  # total_steps stays unset: the schedule spans the run (max_steps x ppo_epochs x minibatches).
  p.optim.update(learning_rate=2e-4, schedule="constant", max_grad_norm=1.0)

  # The "dpo" method's stage: the same pairs as the reward model, the PPO evaluation's prompts
  # and sampling, so the two routes' figures compare.
  c.dpo.update(batch_size=64, epochs=2, max_len=32, eval_fraction=0.1, eval_every=50, seed=0,
               max_prompt_len=12, num_eval_prompts=128)
  c.dpo.loss.update(name="dpo", beta=0.1)
  c.dpo.optim.update(learning_rate=1e-4, schedule="cosine", warmup_steps=20)
  c.dpo.sampling.update(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)

  if variant == "default":
    pass
  elif variant == "smoke":
    c.task.update(num_sft=256, num_pairs=256, num_prompts=128)
    c.model.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64)
    c.sft.update(epochs=1, batch_size=32)
    c.reward.update(epochs=1, batch_size=32)
    c.dpo.update(epochs=1, batch_size=32, eval_every=0, num_eval_prompts=16)
    p.update(batch_size=16, max_steps=3, eval_every=2, num_eval_prompts=16, num_minibatches=2)
  elif variant == "grpo":
    p.update(group_size=4, batch_size=16, critic="none", whiten_advantages=False,
             num_minibatches=4)
    p.advantage.estimator = "grpo"
    p.policy_loss.name = "grpo"
    p.kl.update(in_reward=False, estimator="k3")
  elif variant == "dpo":
    c.method = "dpo"
  elif variant == "grpo_math":
    # A verifiable reward: exact match on held-out sums (`data.arithmetic`), no reward model.
    # The demonstrator slips by one on 30% of the answers; the verifier's reward does not.
    c.task.update(name="arithmetic", num_sft=6000, num_prompts=4096, max_operand=15,
                  sft_noise=0.3)
    c.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=192, max_position_embeddings=16)
    # 6 epochs: the SFT policy's argmax is right on ~95% of the held-out sums, but it samples the
    # right one only ~56% of the time (the slips and more); RL's work is to sharpen it.
    c.sft.update(epochs=6, batch_size=32, max_len=8)
    # 64 prompts x 8 completions per step, 250 steps, Adam at 1e-3 after a 10-step warmup: with
    # 16 prompts a step at 3e-4 the policy barely moved (approx KL ~1e-4) in 60 steps, and at
    # 3e-3 its first steps knocked the right answers' log-probs down and accuracy collapsed.
    p.update(group_size=8, batch_size=64, max_prompt_len=4, critic="none",
             whiten_advantages=False, normalize_reward=False, missing_eos_penalty=0.0,
             num_minibatches=2, ppo_epochs=1, max_steps=250, eval_every=25, num_eval_prompts=64)
    p.sampling.max_new_tokens = 3
    p.rewards.terms = "arithmetic"
    p.advantage.estimator = "grpo"
    p.policy_loss.name = "grpo"
    p.kl.update(in_reward=False, estimator="k3", init_coef=0.01)
    p.optim.update(learning_rate=1e-3, warmup_steps=10)
  elif variant == "lora":
    # Adapters on every projection plus a trained copy of the output head (PEFT's
    # modules_to_save): adapters alone, below the frozen head, do not learn this task.
    p.lora.update(rank=8, alpha=16.0, modules_to_save="lm_head")
    p.optim.learning_rate = 1e-3
  elif variant == "hacking":
    p.kl.init_coef = 0.0
    p.optim.learning_rate = 5e-4
    p.eval_every = 5
  else:
    raise ValueError(f"unknown config variant {variant!r} (default, smoke, grpo, grpo_math, "
                     "dpo, lora, hacking)")
  return c
