"""Tests for rlhf_jax.metrics: the JSONL writer's records and the PNG curves."""

import os

import matplotlib
import pytest

from rlhf_jax import metrics

matplotlib.use("Agg")
RECORDS = [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 0.2, "eval_reward": 1.0, "gold_score": 0.5,
                                     "reward_hacking": 0},
           {"step": 4, "kl": 0.4, "eval_reward": 2.0, "gold_score": 0.1, "reward_hacking": 1}]


def _panels(monkeypatch):
  """Records what each drawn panel holds: its title, its y-axes' line labels, its red lines."""
  import matplotlib.pyplot as plt
  drawn = []
  close = plt.close

  def spy(fig):
    for ax in fig.axes:
      if ax.get_title() or ax.lines:
        drawn.append((ax.get_title(), [ln.get_label() for ln in ax.lines]))
    close(fig)
  monkeypatch.setattr(plt, "close", spy)
  return drawn


def test_proxy_and_gold_share_a_panel_and_firings_are_marked(tmp_path, monkeypatch):
  drawn = _panels(monkeypatch)
  out = metrics.plot_curves(RECORDS, ["kl", ("eval_reward", "gold_score"), "entropy"],
                            str(tmp_path / "c.png"), "PPO", flag_key="reward_hacking")
  assert out == str(tmp_path / "c.png") and os.path.getsize(out) > 1000
  # "entropy" has no data: no panel. Every panel marks the firing at step 4; the pair's panel
  # has the proxy on its own axis and the gold score on a twin.
  assert drawn == [("kl", ["kl", "reward_hacking"]), ("eval_reward / gold_score",
                                               ["eval_reward", "reward_hacking"]),
                   ("", ["gold_score"])]
  assert metrics.plot_curves(RECORDS, ["entropy"], str(tmp_path / "none.png")) is None


def test_plot_runs_puts_runs_side_by_side(tmp_path, monkeypatch):
  drawn = _panels(monkeypatch)
  out = metrics.plot_runs({"a": RECORDS, "b": RECORDS[:2]}, ("eval_reward", "gold_score"),
                          str(tmp_path / "runs.png"), flag_key="reward_hacking")
  assert os.path.getsize(out) > 1000
  assert [t for t, _ in drawn if t] == ["a", "b"]
  with pytest.raises(ValueError, match="at least one run"):
    metrics.plot_runs({}, "kl", str(tmp_path / "x.png"))
