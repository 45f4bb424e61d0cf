"""The arithmetic task end to end in the PPO trainer: GRPO on the exact-match text reward (one
pure_callback inside the jitted collect) raises the accuracy of a tiny policy, seeded."""

import numpy as np
from flax import nnx

from rlhf_jax import data, models, rewards, sharding
from rlhf_jax.advantages import AdvantageConfig
from rlhf_jax.data import arithmetic
from rlhf_jax.kl import KLConfig
from rlhf_jax.losses import PolicyLossConfig
from rlhf_jax.optim import OptimConfig
from rlhf_jax.rollout import SamplingConfig
from rlhf_jax.trainers.ppo import PPOTrainer, PPOTrainerConfig


def test_grpo_on_the_exact_match_reward_raises_accuracy(tmp_path):
  tok = data.build_tokenizer(arithmetic.vocabulary(3), str(tmp_path / "tok"))
  task = arithmetic.make_arithmetic_task(seed=0, n_sft=1, n_prompts=256, n_eval_prompts=2,
                                         max_operand=3)
  cfg = PPOTrainerConfig(
      batch_size=8, group_size=8, max_prompt_len=4, max_steps=16, eval_every=0,
      num_eval_prompts=2, normalize_reward=False, critic="none", ppo_epochs=1,
      num_minibatches=2, whiten_advantages=False, seed=0, checkpoint_every=0,
      # One answer token: a random policy is right about once in len(tok) samples.
      sampling=SamplingConfig(max_new_tokens=1, ignore_eos=True),
      advantage=AdvantageConfig(estimator="grpo"), policy_loss=PolicyLossConfig(name="grpo"),
      kl=KLConfig(in_reward=False, estimator="k3", init_coef=0.0),
      optim=OptimConfig(learning_rate=3e-2, schedule="constant"),
      rewards=rewards.RewardsConfig(terms="arithmetic"))
  mcfg = models.DecoderConfig(model_type="llama", vocab_size=len(tok), hidden_size=32,
                              num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                              intermediate_size=64, max_position_embeddings=8,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
  trainer = PPOTrainer(cfg, models.CausalLM(mcfg, rngs=nnx.Rngs(0)), tok, task.train_prompts,
                       task.eval_prompts, reward_params=None,
                       reward_fn=rewards.make_reward_fn(cfg.rewards, tokenizer=tok),
                       mesh=sharding.make_mesh())   # 8 CPU devices: the callback sees sharded rows
  trainer.train()
  accuracy = [h["reward/arithmetic"] for h in trainer.history]
  np.testing.assert_allclose([h["raw_score_mean"] for h in trainer.history], accuracy)
  first, last = np.mean(accuracy[:3]), np.mean(accuracy[-3:])
  assert first < 0.3 and last > first + 0.3, accuracy
