"""Offline preference-optimisation losses (DPO and kin), registered by name in
`PREFERENCE_LOSSES`.

Contract: fn(cfg: PreferenceLossConfig, x: PreferenceInputs) -> (scalar loss, aux), every input
[B] float32, the loss a mean over the B pairs (so `trainers.fit`'s row-count microbatching is
exact, except for `kto`'s batch-level reference point, see there). Notation, per pair i:
pi_c, pi_r = log pi(y_c | x), log pi(y_r | x), summed over completion tokens (`sequence_logps`);
rho_c, rho_r the same under the frozen reference; |y| the completion's token count (EOS
included); sigma the logistic function; beta = `cfg.beta`.

aux always holds the means of "chosen_reward" and "rejected_reward" (each loss's implicit reward:
beta * (pi - rho) for the reference-based losses, beta * pi / |y| for the reference-free ones,
as TRL logs them), "reward_accuracy" (share of pairs with chosen_reward > rejected_reward),
"reward_margin" (chosen_reward - rejected_reward) and "chosen_logps" / "rejected_logps" (pi_c,
pi_r).

Registered here: dpo, cdpo, robust, ipo, simpo, orpo, kto. A fork adds one with
`@register_preference_loss("name")` and picks it with `--config.dpo.loss.name=name`.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_sum
from rlhf_jax.registry import Registry

Aux = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
  """Which preference loss, and its coefficients.

  Attributes:
    name: A registered preference loss (`PREFERENCE_LOSSES`).
    beta: Inverse temperature of the implicit reward (dpo, cdpo, robust, kto: the KL weight of
      the paper; ipo: tau, the target margin is 1 / (2 tau); simpo: the paper's beta; orpo: the
      weight lambda of the odds-ratio term, TRL's convention).
    label_smoothing: Assumed share epsilon of flipped labels, in [0, 0.5); read by cdpo and
      robust only, so it must stay 0 for the other losses.
    simpo_gamma: SimPO's target reward margin gamma (in reward units, beta already applied).
    kto_desirable_weight, kto_undesirable_weight: KTO's lambda_D and lambda_U.
  """
  name: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  kto_desirable_weight: float = 1.0
  kto_undesirable_weight: float = 1.0

  def __post_init__(self):
    if self.beta <= 0:
      raise ValueError(f"beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.label_smoothing and self.name not in ("cdpo", "robust"):
      raise ValueError(f"label_smoothing is read by the cdpo and robust losses only, not by "
                       f"{self.name!r}")
    if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
      raise ValueError("kto_desirable_weight and kto_undesirable_weight must be > 0")

  @property
  def needs_reference(self) -> bool:
    """Whether the loss reads reference log-probs (simpo and orpo are reference-free)."""
    return self.name not in REFERENCE_FREE

  @property
  def needs_kl_rows(self) -> bool:
    """Whether the loss reads `PreferenceInputs.kl_logps` (kto's reference point)."""
    return self.name == "kto"


class PreferenceInputs(NamedTuple):
  """Per-pair sequence log-probs [B] (float32) of a batch of preference pairs.

  kl_logps / ref_kl_logps: policy and reference log-probs of mismatched (prompt, completion)
  rows, the other pairs' completions after each prompt (KTO's reference-point estimate); None
  unless the loss needs them. The reference fields are zeros for reference-free losses.
  """
  chosen_logps: jax.Array
  rejected_logps: jax.Array
  ref_chosen_logps: jax.Array
  ref_rejected_logps: jax.Array
  chosen_lengths: jax.Array
  rejected_lengths: jax.Array
  kl_logps: jax.Array | None = None
  ref_kl_logps: jax.Array | None = None


PreferenceLoss = Callable[[PreferenceLossConfig, PreferenceInputs], tuple[jax.Array, Aux]]
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")
REFERENCE_FREE = ("simpo", "orpo")


def register_preference_loss(name: str) -> Callable[[PreferenceLoss], PreferenceLoss]:
  """Decorator registering `fn(cfg, inputs) -> (loss, aux)` under `name`."""
  return PREFERENCE_LOSSES.register(name)


def preference_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """The loss `cfg.name` on `x`, after checking shapes and casting to float32."""
  fields = [v for v in x if v is not None]
  chex.assert_rank(fields, 1)
  chex.assert_equal_shape(fields[:6])
  x = PreferenceInputs(*(None if v is None else v.astype(jnp.float32) for v in x))
  if cfg.needs_kl_rows and x.kl_logps is None:
    raise ValueError(f"the {cfg.name!r} loss needs kl_logps and ref_kl_logps")
  return PREFERENCE_LOSSES.get(cfg.name)(cfg, x)


def sequence_logps(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_t m_t logp_t [B], sum_t m_t [B]) of per-token log-probs [B, T] under a completion
  mask, both float32; padding is selected away (`masked_sum`), so its values never count."""
  chex.assert_rank([token_logps, mask], 2)
  return masked_sum(token_logps, mask, axis=-1), jnp.sum(mask != 0, axis=-1, dtype=jnp.float32)


def _average(logps: jax.Array, lengths: jax.Array) -> jax.Array:
  """Per-token mean log-prob; an empty row (a padding row) counts as one token, not 0/0."""
  return logps / jnp.maximum(lengths, 1.0)


def _aux(x: PreferenceInputs, chosen_reward: jax.Array, rejected_reward: jax.Array,
         **extra: jax.Array) -> Aux:
  return {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
          "reward_accuracy": jnp.mean(chosen_reward > rejected_reward, dtype=jnp.float32),
          "reward_margin": jnp.mean(chosen_reward - rejected_reward),
          "chosen_logps": x.chosen_logps.mean(), "rejected_logps": x.rejected_logps.mean(),
          **extra}


def _log_ratios(x: PreferenceInputs) -> tuple[jax.Array, jax.Array]:
  return x.chosen_logps - x.ref_chosen_logps, x.rejected_logps - x.ref_rejected_logps


def _smoothed(cfg: PreferenceLossConfig, x: PreferenceInputs, robust: bool):
  chosen, rejected = _log_ratios(x)
  h = cfg.beta * (chosen - rejected)
  eps = cfg.label_smoothing
  if robust:
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(h) + eps * jax.nn.log_sigmoid(-h)) / (1.0 - 2 * eps)
  else:
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
  return losses.mean(), _aux(x, cfg.beta * chosen, cfg.beta * rejected)


@register_preference_loss("dpo")
def dpo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290, eq. 7).

  h_i = beta * ((pi_c - rho_c) - (pi_r - rho_r));  loss = mean_i -log sigma(h_i).
  """
  return _smoothed(cfg, x, robust=False)


@register_preference_loss("cdpo")
def cdpo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's "sigmoid"
  loss with `label_smoothing`): DPO against labels flipped with probability eps.

  loss = mean_i -(1 - eps) log sigma(h_i) - eps log sigma(-h_i), h_i as in `dpo`.
  """
  return _smoothed(cfg, x, robust=False)


@register_preference_loss("robust")
def robust_dpo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, eq. 12; TRL's
  "robust"): an unbiased estimate of the clean-label DPO loss under flip rate eps.

  loss = mean_i [-(1 - eps) log sigma(h_i) + eps log sigma(-h_i)] / (1 - 2 eps), h_i as in `dpo`.
  """
  return _smoothed(cfg, x, robust=True)


@register_preference_loss("ipo")
def ipo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Identity Preference Optimization (Azar et al. 2023, arXiv:2310.12036, eq. 17), on
  length-averaged log-probs as TRL's DPOTrainer computes it (the paper writes sequence sums):

  h_i = (pi_c - rho_c) / |y_c| - (pi_r - rho_r) / |y_r|;  loss = mean_i (h_i - 1 / (2 beta))^2.

  The implicit rewards in aux are beta times the averaged log-ratios.
  """
  chosen, rejected = _log_ratios(x)
  chosen, rejected = _average(chosen, x.chosen_lengths), _average(rejected, x.rejected_lengths)
  losses = jnp.square(chosen - rejected - 1.0 / (2.0 * cfg.beta))
  return losses.mean(), _aux(x, cfg.beta * chosen, cfg.beta * rejected)


@register_preference_loss("simpo")
def simpo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734, eq. 6), reference-free:

  r_i = beta * pi / |y| (length-normalised);  loss = mean_i -log sigma(r_c,i - r_r,i - gamma),

  gamma = `simpo_gamma` (TRL's CPOTrainer writes it as beta * gamma_beta_ratio).
  """
  chosen = cfg.beta * _average(x.chosen_logps, x.chosen_lengths)
  rejected = cfg.beta * _average(x.rejected_logps, x.rejected_lengths)
  losses = -jax.nn.log_sigmoid(chosen - rejected - cfg.simpo_gamma)
  return losses.mean(), _aux(x, chosen, rejected)


def _log1m_exp(a: jax.Array) -> jax.Array:
  """log(1 - exp(a)) for a < 0, accurate on both sides of a = -log 2 (Maechler 2012); a is
  clipped just below 0, where a sequence of probability 1 would make the odds infinite."""
  a = jnp.minimum(a, -1e-6)
  return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


@register_preference_loss("orpo")
def orpo_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7),
  reference-free, with the SFT term:

  a = pi / |y|;  log odds(y) = a - log(1 - exp(a));
  loss = mean_i -a_c,i + beta * mean_i -log sigma(log odds(y_c,i) - log odds(y_r,i)).

  The NLL term is each chosen completion's per-token mean, averaged over pairs (TRL averages
  over all chosen tokens of the batch instead; a row mean keeps microbatching exact). aux adds
  "nll" and "log_odds_ratio" (means); its rewards are beta * a, as TRL logs them.
  """
  chosen = _average(x.chosen_logps, x.chosen_lengths)
  rejected = _average(x.rejected_logps, x.rejected_lengths)
  log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
  nll = -chosen.mean()
  loss = nll - cfg.beta * jax.nn.log_sigmoid(log_odds).mean()
  return loss, _aux(x, cfg.beta * chosen, cfg.beta * rejected, nll=nll,
                    log_odds_ratio=log_odds.mean())


@register_preference_loss("kto")
def kto_loss(cfg: PreferenceLossConfig, x: PreferenceInputs) -> tuple[jax.Array, Aux]:
  """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8), each pair
  read as one desirable (chosen) and one undesirable (rejected) example, as TRL's KTOTrainer
  does with paired data:

  z0 = sg[max(0, mean_j (pi(y'_j | x_j) - rho(y'_j | x_j)))]   (y'_j: a mismatched completion,
       the paper's batch estimate of KL(pi || pi_ref) and TRL's "KL" rows);
  loss = mean_i [lambda_D (1 - sigma(beta (pi_c - rho_c - z0)))
                 + lambda_U (1 - sigma(beta (z0 - pi_r + rho_r)))] / 2.

  z0 comes from the rows at hand, so under microbatching it is each microbatch's estimate (as
  it is each device's in TRL). aux adds "reference_point" (z0).
  """
  chosen, rejected = _log_ratios(x)
  z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(x.kl_logps - x.ref_kl_logps), 0.0))
  desirable = cfg.kto_desirable_weight * (1.0 - jax.nn.sigmoid(cfg.beta * (chosen - z0)))
  undesirable = cfg.kto_undesirable_weight * (1.0 - jax.nn.sigmoid(cfg.beta * (z0 - rejected)))
  loss = 0.5 * (desirable.mean() + undesirable.mean())
  return loss, _aux(x, cfg.beta * chosen, cfg.beta * rejected, reference_point=z0)
