"""Policy, value, SFT and Bradley-Terry losses for padded completions.

Inputs are [B, T] arrays with a mask (1 = valid completion token); everything is computed in
float32 whatever the input dtype, and masked positions never influence a result or a gradient.

Losses are registered by name and picked by a config string (as in tunix). Uniform signatures:

  policy: fn(cfg: PolicyLossConfig, logprobs, old_logprobs, advantages, mask)
            -> (loss scalar, aux dict with at least "clipfrac" and "approx_kl")
  value:  fn(cfg: ValueLossConfig, values, old_values, returns, mask)
            -> (loss scalar, aux dict with at least "vf_clipfrac")

A fork adds one with `@register_policy_loss("name")` / `@register_value_loss("name")`.

Each loss also declares its normalizer, the count of the batch it divides by, so that
`ppo_update` can split a minibatch into microbatches (`PPOConfig.micro_batch_size`) exactly:

  "token":    valid tokens (a token-level mean; the default),
  "sequence": rows with at least one valid token (a mean over sequences, as grpo),
  "row":      all rows (a mean over rows, or a sum divided by a constant per row).

A loss of the form sum_{i in batch} f_i / n, with n its normalizer's count and f_i the terms of
one token or row, is recovered from microbatches k by sum_k (n_k / n) loss_k: each microbatch's
loss, computed as the function sees it, is scaled by its share n_k / n of the minibatch's count
(`normalizer_counts`). Aux metrics are token-level means and are combined with the token share.
"""

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.masked import masked_mean
from rlhf_jax.registry import Registry

Aux = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Policy loss selection and clipping.

  Attributes:
    name: Key of `POLICY_LOSSES`.
    clip_eps: Lower clip range: ratio >= 1 - clip_eps.
    clip_eps_high: Upper clip range: ratio <= 1 + clip_eps_high; None means clip_eps (DAPO,
      Yu et al. 2025, decouples the two).
    dual_clip_c: Bound c > 1 of dual-clip PPO on the loss of negative-advantage tokens.
    log_clip_eps: Clip range of "gmpo" in log-ratio space: log r in [-log_clip_eps,
      log_clip_eps] on the side the advantage's sign makes binding (0.4 in the GMPO paper).
    sapo_tau_pos: Temperature of the "sapo" gate for tokens with A > 0 (1.0 in the SAPO paper).
    sapo_tau_neg: Temperature of the "sapo" gate for tokens with A <= 0 (1.05 in the SAPO paper;
      larger decays faster).
  """

  name: str = "ppo"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip_c: float = 3.0
  log_clip_eps: float = 0.4
  sapo_tau_pos: float = 1.0
  sapo_tau_neg: float = 1.05

  def __post_init__(self):
    if self.clip_eps < 0:
      raise ValueError(f"clip_eps must be >= 0, got {self.clip_eps}")
    if self.clip_eps_high is not None and self.clip_eps_high < 0:
      raise ValueError(f"clip_eps_high must be >= 0, got {self.clip_eps_high}")
    if self.dual_clip_c <= 1:
      raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
    if self.log_clip_eps < 0:
      raise ValueError(f"log_clip_eps must be >= 0, got {self.log_clip_eps}")
    if self.sapo_tau_pos <= 0:
      raise ValueError(f"sapo_tau_pos must be > 0, got {self.sapo_tau_pos}")
    if self.sapo_tau_neg <= 0:
      raise ValueError(f"sapo_tau_neg must be > 0, got {self.sapo_tau_neg}")

  @property
  def eps_high(self) -> float:
    return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclasses.dataclass(frozen=True)
class ValueLossConfig:
  """Value loss selection.

  Attributes:
    name: Key of `VALUE_LOSSES`.
    clip_eps: Clip range of the value update around the old values ("clipped").
  """

  name: str = "clipped"
  clip_eps: float = 0.2

  def __post_init__(self):
    if self.clip_eps < 0:
      raise ValueError(f"clip_eps must be >= 0, got {self.clip_eps}")


PolicyLoss = Callable[[PolicyLossConfig, jax.Array, jax.Array, jax.Array, jax.Array],
                      tuple[jax.Array, Aux]]
ValueLoss = Callable[[ValueLossConfig, jax.Array, jax.Array, jax.Array, jax.Array],
                     tuple[jax.Array, Aux]]

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
VALUE_LOSSES: Registry[ValueLoss] = Registry("value loss")

NORMALIZERS = ("token", "sequence", "row")
# (registry kind, loss name) -> normalizer; a loss registered on the Registry directly is "token".
_NORMALIZER_OF: dict[tuple[str, str], str] = {}


def _register(registry: Registry, name: str, normalizer: str) -> Callable:
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  register = registry.register(name)

  def decorator(fn):
    fn = register(fn)
    _NORMALIZER_OF[(registry.kind, name)] = normalizer
    return fn
  return decorator


def register_policy_loss(name: str,
                         normalizer: str = "token") -> Callable[[PolicyLoss], PolicyLoss]:
  """Decorator registering `fn(cfg, logprobs, old_logprobs, advantages, mask)` under `name`,
  dividing by the `normalizer` count (one of `NORMALIZERS`, see the module docstring)."""
  return _register(POLICY_LOSSES, name, normalizer)


def register_value_loss(name: str, normalizer: str = "token") -> Callable[[ValueLoss], ValueLoss]:
  """Decorator registering `fn(cfg, values, old_values, returns, mask)` under `name`, dividing
  by the `normalizer` count (one of `NORMALIZERS`, see the module docstring)."""
  return _register(VALUE_LOSSES, name, normalizer)


def loss_normalizer(registry: Registry, name: str) -> str:
  """The normalizer the loss `name` of `registry` (POLICY_LOSSES or VALUE_LOSSES) declared."""
  registry.get(name)
  return _NORMALIZER_OF.get((registry.kind, name), "token")


def normalizer_counts(mask: jax.Array) -> dict[str, jax.Array]:
  """The float32 count each of `NORMALIZERS` divides by, on a [B, T] mask (1 = valid token)."""
  chex.assert_rank(mask, 2)
  valid = mask.astype(bool)
  return {"token": jnp.sum(valid, dtype=jnp.float32),
          "sequence": jnp.sum(jnp.any(valid, axis=1), dtype=jnp.float32),
          "row": jnp.asarray(mask.shape[0], jnp.float32)}


def _check_and_cast(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Checks [B, T] shapes of (*arrays, mask); returns (*arrays in float32, bool mask).

  The arrays are zeroed at masked positions, so garbage in padding cannot produce inf / NaN.
  """
  chex.assert_rank(arrays, 2)
  chex.assert_equal_shape(arrays)
  *xs, mask = arrays
  valid = mask.astype(bool)
  return (*(jnp.where(valid, x.astype(jnp.float32), 0.0) for x in xs), valid)


def _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask):
  logprobs, old_logprobs, advantages, valid = _check_and_cast(logprobs, old_logprobs, advantages,
                                                              mask)
  return logprobs - old_logprobs, advantages, valid


def _approx_kl(log_ratio: jax.Array, valid: jax.Array) -> jax.Array:
  """Masked mean of k3(old || new) = (ratio - 1) - log ratio (Schulman 2020)."""
  return masked_mean(jnp.expm1(log_ratio) - log_ratio, valid)


def _mean_over_sequences(per_sequence: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of per-row values [B] over the rows of `valid` [B, T] with at least one valid token."""
  return masked_mean(per_sequence, jnp.any(valid, axis=1))


def _clipped_surrogate(cfg: PolicyLossConfig, log_ratio: jax.Array,
                       advantages: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token PPO loss max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) and where clipping binds."""
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.eps_high)
  return jnp.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("ppo")
def ppo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
             advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), token-level mean.

  r_t = exp(logp_t - old_logp_t);  l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps_high));
  loss = sum_t m_t l_t / sum_t m_t over all valid tokens of the batch.
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  per_token, clipped = _clipped_surrogate(cfg, log_ratio, adv)
  return masked_mean(per_token, valid), {
      "clipfrac": masked_mean(clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("ppo_dual_clip")
def ppo_dual_clip_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                       advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games", arXiv:1912.09729).

  As "ppo", but for A_t < 0 the per-token loss is min(l_t, -c A_t), which bounds the loss when
  the ratio is far above 1 + eps. Extra aux "dual_clipfrac": fraction of tokens where -c A binds.
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  per_token, clipped = _clipped_surrogate(cfg, log_ratio, adv)
  dual_bound = -cfg.dual_clip_c * adv
  dual_clipped = (adv < 0) & (dual_bound < per_token)
  per_token = jnp.where(dual_clipped, dual_bound, per_token)
  return masked_mean(per_token, valid), {
      "clipfrac": masked_mean(clipped, valid),
      "dual_clipfrac": masked_mean(dual_clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("grpo", normalizer="sequence")
def grpo_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """GRPO clipped objective, averaged per sequence first, then over sequences.

  Shao et al. 2024, DeepSeekMath (arXiv:2402.03300), eq. 3:

    loss = 1/|S| sum_{i in S} 1/|o_i| sum_t l_{i,t},

  with l the PPO per-token loss, |o_i| the valid tokens of row i and S the rows with at least one
  valid token (all-padding rows are ignored rather than diluting the mean). The KL term of the
  paper, when used (KLConfig.in_reward=False), is added by the caller.
  """
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  per_token, clipped = _clipped_surrogate(cfg, log_ratio, adv)
  return _mean_over_sequences(masked_mean(per_token, valid, axis=1), valid), {
      "clipfrac": masked_mean(clipped, valid),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


@register_policy_loss("reinforce")
def reinforce_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                   advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Importance-weighted vanilla policy gradient (Williams 1992), token-level mean.

  loss = -sum_t m_t A_t r_t / sum_t m_t; on-policy (r = 1) its gradient is
  -sum_t m_t A_t grad logp_t / sum_t m_t. No clipping, so "clipfrac" is 0.
  """
  del cfg  # No hyperparameters.
  log_ratio, adv, valid = _log_ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
  return -masked_mean(adv * jnp.exp(log_ratio), valid), {
      "clipfrac": jnp.zeros((), jnp.float32),
      "approx_kl": _approx_kl(log_ratio, valid),
  }


def policy_loss(cfg: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Runs the policy loss named `cfg.name` (static: pass `cfg` as a static argument under jit).

  Args:
    cfg: Loss config.
    logprobs: log pi_theta(a_t | s_t) of the sampled tokens, [B, T].
    old_logprobs: The same under the policy that sampled them, [B, T].
    advantages: [B, T].
    mask: [B, T], 1 = valid completion token.

  Returns:
    (loss scalar float32, aux metrics dict).
  """
  loss, aux = POLICY_LOSSES.get(cfg.name)(cfg, logprobs, old_logprobs, advantages, mask)
  chex.assert_rank(loss, 0)
  return loss, aux


@register_value_loss("clipped")
def clipped_value_loss(cfg: ValueLossConfig, values: jax.Array, old_values: jax.Array,
                       returns: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Clipped value loss of PPO2 / Ziegler et al. 2019 (lm-human-preferences).

  v_clip = old_v + clip(v - old_v, -eps, eps);
  loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)); "vf_clipfrac" = fraction of valid
  tokens where the clipped term is the larger one.
  """
  values, old_values, returns, valid = _check_and_cast(values, old_values, returns, mask)
  unclipped = jnp.square(values - returns)
  values_clipped = old_values + jnp.clip(values - old_values, -cfg.clip_eps, cfg.clip_eps)
  clipped = jnp.square(values_clipped - returns)
  return 0.5 * masked_mean(jnp.maximum(unclipped, clipped), valid), {
      "vf_clipfrac": masked_mean(clipped > unclipped, valid),
  }


@register_value_loss("mse")
def mse_value_loss(cfg: ValueLossConfig, values: jax.Array, old_values: jax.Array,
                   returns: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """loss = 0.5 * masked_mean((v - R)^2); "vf_clipfrac" = 0 (no clipping)."""
  del cfg, old_values  # Unclipped: the old values play no role.
  values, returns, valid = _check_and_cast(values, returns, mask)
  return 0.5 * masked_mean(jnp.square(values - returns), valid), {
      "vf_clipfrac": jnp.zeros((), jnp.float32),
  }


def value_loss(cfg: ValueLossConfig, values: jax.Array, old_values: jax.Array,
               returns: jax.Array, mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Runs the value loss named `cfg.name` (static: pass `cfg` as a static argument under jit).

  Args:
    cfg: Loss config.
    values: Current value predictions, [B, T].
    old_values: Value predictions at rollout time, [B, T].
    returns: Regression targets, [B, T].
    mask: [B, T], 1 = valid completion token.

  Returns:
    (loss scalar float32, aux metrics dict).
  """
  loss, aux = VALUE_LOSSES.get(cfg.name)(cfg, values, old_values, returns, mask)
  chex.assert_rank(loss, 0)
  return loss, aux


def sft_loss(logits: jax.Array, ids: jax.Array,
             completion_mask: jax.Array) -> tuple[jax.Array, Aux]:
  """Next-token cross entropy on completion tokens only (supervised fine-tuning).

  Position t predicts ids[t + 1] and counts iff completion_mask[t + 1] = 1 (Radford et al. 2018;
  prompt tokens are context, not targets, as in Ouyang et al. 2022's SFT):

    loss = -sum_t m_{t+1} log softmax(logits_t)[ids_{t+1}] / sum_t m_{t+1}.

  Args:
    logits: [B, T, V] logits of the model run on `ids` (unshifted).
    ids: [B, T] integer token ids.
    completion_mask: [B, T], 1 on completion tokens (EOS included).

  Returns:
    (loss scalar float32, aux with "token_accuracy" (argmax == target over counted tokens) and
    "num_tokens" (the float32 count of counted targets, to weight means across batches)).
  """
  chex.assert_rank([logits, ids, completion_mask], [3, 2, 2])
  chex.assert_equal_shape([ids, completion_mask])
  chex.assert_equal_shape_prefix([logits, ids], 2)
  chex.assert_type(ids, int)
  logits, targets, valid = logits[:, :-1], ids[:, 1:], completion_mask[:, 1:].astype(bool)
  nll = -token_logprobs(logits, targets)
  correct = jnp.argmax(logits, axis=-1) == targets
  return masked_mean(nll, valid), {
      "token_accuracy": masked_mean(correct, valid),
      "num_tokens": jnp.sum(valid, dtype=jnp.float32),
  }


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array,
                       margin: jax.Array | None = None,
                       center_coef: float = 0.0) -> tuple[jax.Array, Aux]:
  """Pairwise reward-model loss of the Bradley-Terry preference model.

  Bradley & Terry 1952; as used for RLHF reward models by Ouyang et al. 2022 (eq. 1), with the
  optional per-pair margin m of Touvron et al. 2023 (Llama 2) and the reward-centering penalty of
  Eisenstein et al. 2023 ("Helping or Herding?"):

    loss = mean_i -log sigmoid(r_c,i - r_r,i - m_i) + center_coef * mean_i (r_c,i + r_r,i)^2.

  Computed with `jax.nn.log_sigmoid`, finite for any reward gap.

  Args:
    r_chosen: [N] rewards of the preferred completions.
    r_rejected: [N] rewards of the other completions of the same pairs.
    margin: optional [N] required gaps m_i (None: 0).
    center_coef: weight of the centering penalty (0: off).

  Returns:
    (loss scalar float32, aux with "accuracy" (fraction with r_c > r_r) and "margin_mean"
    (mean r_c - r_r)).
  """
  chex.assert_rank([r_chosen, r_rejected], 1)
  chex.assert_equal_shape([r_chosen, r_rejected])
  r_chosen, r_rejected = r_chosen.astype(jnp.float32), r_rejected.astype(jnp.float32)
  if margin is not None:
    chex.assert_equal_shape([margin, r_chosen])
  gap = r_chosen - r_rejected
  shifted = gap if margin is None else gap - margin.astype(jnp.float32)
  loss = -jnp.mean(jax.nn.log_sigmoid(shifted))
  loss = loss + center_coef * jnp.mean(jnp.square(r_chosen + r_rejected))
  return loss, {
      "accuracy": jnp.mean(gap > 0),
      "margin_mean": jnp.mean(gap),
  }
