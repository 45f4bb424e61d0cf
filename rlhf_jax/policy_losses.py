"""The 2025 policy-optimisation family, registered into `losses.POLICY_LOSSES` by name.

Same contract as the losses in `rlhf_jax.losses`: fn(cfg: PolicyLossConfig, logprobs,
old_logprobs, advantages, mask) -> (loss, aux with at least "clipfrac" and "approx_kl"), all [B, T],
float32 whatever the input dtype, masked positions inert in value and gradient. Notation:
r_t = exp(logp_t - old_logp_t), m = mask, sg = stop-gradient, eps_low = clip_eps,
eps_high = clip_eps_high (or clip_eps), |o_i| = valid tokens of row i.

Sequence-level losses (gspo, gmpo) use one advantage per row, A_i = mean of the row's valid
advantages; the group estimators broadcast one value per row, so this is that value. Losses that
average per sequence first ignore all-padding rows, as "grpo" does. "approx_kl" is the token-level
k3 of `losses._approx_kl` everywhere, so it compares across losses.

Registered here (on `import rlhf_jax`): gspo, gspo_token, dr_grpo, dapo, cispo, gmpo, sapo.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.losses import (Aux, PolicyLossConfig, _approx_kl, _check_and_cast,
                             _clipped_surrogate, _log_ratio_and_advantages, _mean_over_sequences,
                             ppo_loss, register_policy_loss)
from rlhf_jax.masked import masked_mean, masked_sum


@register_policy_loss("gspo", normalizer="sequence")
def gspo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071).

  s_i = exp(1/|o_i| sum_t m_t log r_it)  (length-normalised sequence ratio);
  l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high));
  loss = mean of l_i over the rows with a valid token.

  The paper reports clip ranges far narrower than PPO's (3e-4 / 4e-4) because s_i is a geometric
  mean; set clip_eps / clip_eps_high accordingly. "clipfrac" is the fraction of those rows where
  the clipped term binds.
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  per_sequence, clipped = _clipped_surrogate(cfg, masked_mean(log_ratio, valid, axis=1),
                                             masked_mean(adv, valid, axis=1))
  return _mean_over_sequences(per_sequence, valid), {
      "clipfrac": _mean_over_sequences(clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("gspo_token", normalizer="sequence")
def gspo_token_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                    advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """GSPO-token (Zheng et al. 2025, arXiv:2507.18071), with per-token advantages.

  s_it = sg[s_i] * pi_it / sg[pi_it] (value s_i, gradient s_i * grad log pi_it);
  l_it = max(-A_it s_it, -A_it clip(s_it, 1 - eps_low, 1 + eps_high));
  loss = mean over non-empty rows of 1/|o_i| sum_t m_t l_it.

  With A_it = A_i on every token its value and gradient equal "gspo"'s. "clipfrac" is the
  fraction of valid tokens where the clipped term binds.
  """
  logprobs, old_logprobs, adv, valid = _check_and_cast(logprobs, old_logprobs, advantages, mask)
  log_ratio = logprobs - old_logprobs
  log_s = jax.lax.stop_gradient(masked_mean(log_ratio, valid, axis=1))
  token_log_ratio = log_s[:, None] + logprobs - jax.lax.stop_gradient(logprobs)
  per_token, clipped = _clipped_surrogate(cfg, token_log_ratio, adv)
  return _mean_over_sequences(masked_mean(per_token, valid, axis=1), valid), {
      "clipfrac": masked_mean(clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("dr_grpo", normalizer="row")
def dr_grpo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                 advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Dr. GRPO objective (Liu et al. 2025, "Understanding R1-Zero-Like Training",
  arXiv:2503.20783): GRPO without the per-sequence length normalisation.

  l_it = the PPO per-token loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));
  loss = sum_{i,t} m_it l_it / (B * T),

  a constant divisor (the paper's G * L_max: rows times the padded completion length of the batch,
  all-padding rows included), so a token weighs the same in a short and in a long completion.
  Pair it with advantage estimator "dr_grpo" (no std division).
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  per_token, clipped = _clipped_surrogate(cfg, log_ratio, adv)
  return masked_sum(per_token, valid) / valid.size, {
      "clipfrac": masked_mean(clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("dapo")
def dapo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """DAPO's policy loss (Yu et al. 2025, arXiv:2503.14476): clip-higher, token-level.

  loss = sum_{i,t} m_it max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) / sum_{i,t} m_it,

  i.e. "ppo" with a decoupled upper clip, which is why `cfg.clip_eps_high` must be set (the paper
  uses eps_low = 0.2, eps_high = 0.28). The sum runs over the batch passed in; DAPO's other parts
  (dynamic sampling, overlong shaping) live outside the loss.

  Raises:
    ValueError: if `cfg.clip_eps_high` is None (that is plain "ppo").
  """
  if cfg.clip_eps_high is None:
    raise ValueError("policy loss 'dapo' decouples the clip range: set clip_eps_high "
                     "(the DAPO paper uses clip_eps=0.2, clip_eps_high=0.28)")
  return ppo_loss(cfg, logprobs, old_logprobs, advantages, mask)


@register_policy_loss("cispo")
def cispo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
               advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """CISPO (MiniMax 2025, "MiniMax-M1", arXiv:2506.13585): clip the IS weight, not the
  update.

  w_t = sg[clip(r_t, 1 - eps_low, 1 + eps_high)];
  loss = -sum_t m_t w_t A_t logp_t / sum_t m_t,

  so every token keeps a gradient -w_t A_t grad logp_t / N, through log pi only. The paper sets no
  lower bound in practice (a large eps_low: clip_eps >= 1 here). "clipfrac" is the fraction of
  valid tokens whose weight is clipped, whatever the advantage's sign.
  """
  logprobs, old_logprobs, adv, valid = _check_and_cast(logprobs, old_logprobs, advantages, mask)
  log_ratio = logprobs - old_logprobs
  ratio = jnp.exp(log_ratio)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.eps_high))
  return -masked_mean(weight * adv * logprobs, valid), {
      "clipfrac": masked_mean(weight != jax.lax.stop_gradient(ratio), valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("gmpo", normalizer="sequence")
def gmpo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv:2507.20673).

  With e = cfg.log_clip_eps and sgn = sign(A_i), each token's log-ratio is clipped in log space on
  the pessimistic side only (as verl's "geo_mean" loss implements it):

    c_it = sgn * min(sgn * log r_it, clip(sgn * log r_it, -e, e))
         (A_i > 0: min(log r, e); A_i < 0: max(log r, -e); A_i = 0: 0);
    l_i  = -A_i exp(1/|o_i| sum_t m_t c_it)   (A_i times the clipped geometric-mean ratio);
    loss = mean of l_i over the rows with a valid token.

  This is minus the paper's per-sequence objective
  sgn(A_i) (prod_t |min(r_it A_i, clip(r_it, e^-e, e^e) A_i)|)^(1/|o_i|). "clipfrac" is the
  fraction of valid tokens whose log-ratio is clipped.
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  seq_adv = masked_mean(adv, valid, axis=1)
  sign = jnp.sign(seq_adv)[:, None]
  signed = sign * log_ratio
  clipped_log_ratio = sign * jnp.minimum(signed, jnp.clip(signed, -cfg.log_clip_eps,
                                                          cfg.log_clip_eps))
  per_sequence = -seq_adv * jnp.exp(masked_mean(clipped_log_ratio, valid, axis=1))
  return _mean_over_sequences(per_sequence, valid), {
      "clipfrac": masked_mean(signed > cfg.log_clip_eps, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("sapo", normalizer="sequence")
def sapo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv:2511.20347): a sigmoid gate on the
  ratio in place of the hard clip.

  tau_t = sapo_tau_pos if A_t > 0 else sapo_tau_neg;
  f_t = (4 / tau_t) sigmoid(tau_t (r_t - 1));
  loss = -mean over non-empty rows of 1/|o_i| sum_t m_t f_t A_t.

  d f / d r = 4 s (1 - s) with s = sigmoid(tau (r - 1)): 1 on-policy (the plain policy gradient),
  decaying smoothly as r leaves 1, faster for the larger temperature. The gate and the defaults
  (tau_pos 1.0, tau_neg 1.05) are as SAPO's public implementations state them (ms-swift,
  Trinity-RFT, torchtitan); the sequence-then-batch mean follows the paper's GRPO-style objective
  1/G sum_i 1/|o_i| sum_t (Trinity-RFT defaults to a token mean instead). No hard clip, so
  "clipfrac" is 0; "gate_weight" is the masked mean of 4 s (1 - s).
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  tau = jnp.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
  gate = jax.nn.sigmoid(tau * jnp.expm1(log_ratio))
  per_token = -(4.0 / tau) * gate * adv
  return _mean_over_sequences(masked_mean(per_token, valid, axis=1), valid), {
      "clipfrac": jnp.zeros((), jnp.float32),
      "gate_weight": masked_mean(4.0 * gate * (1.0 - gate), valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }
