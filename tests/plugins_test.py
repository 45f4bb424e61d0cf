"""Plugins: a module in a temporary directory registers a policy loss and a reward, and the PPO
stage main trains with both, picked by name from the command line."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rlhf_jax import losses, pipeline, plugins, rewards
from rlhf_jax.metrics import read_jsonl
from tests import tiny_ppo

PLUGIN = textwrap.dedent('''
    import jax.numpy as jnp
    from rlhf_jax import losses, rewards

    @losses.register_policy_loss("test_plugin_pg")
    def pg(cfg, logprobs, old_logprobs, advantages, mask):
      """-A r, mean over valid tokens, with a marker metric showing this loss ran."""
      m = mask.astype(jnp.float32)
      loss = -jnp.sum(advantages * jnp.exp(logprobs - old_logprobs) * m) / jnp.maximum(m.sum(), 1)
      zero = jnp.zeros((), jnp.float32)
      return loss, {"clipfrac": zero, "approx_kl": zero, "plugin_marker": zero + 1.0}

    @rewards.register_token_reward("test_plugin_reward")
    def share_of_5(cfg, rollout):
      m = rollout.completion_mask
      return ((rollout.completion_ids == 5) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
''')


def test_import_plugins_registers_and_reports_failures(tmp_path, monkeypatch):
  (tmp_path / "test_plugin_inproc.py").write_text(PLUGIN.replace("test_plugin_", "test_inproc_"))
  (tmp_path / "test_plugin_broken.py").write_text("raise RuntimeError('boom')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert plugins.plugin_names(" a.b, c ,") == ["a.b", "c"] and plugins.plugin_names("") == []
  cd = {"plugins": "test_plugin_inproc", "ppo": {"policy_loss": {"name": "test_inproc_pg"},
                                                 "rewards": {"terms": "test_inproc_reward"}}}
  config = plugins.build_config(pipeline.ExperimentConfig, cd)
  assert config.ppo.policy_loss.name in losses.POLICY_LOSSES
  assert "test_inproc_reward" in rewards.REWARDS
  for spec, match in (("no_such_module_xyz", "plugin 'no_such_module_xyz' could not be imported: "
                       "ModuleNotFoundError"),
                      ("test_plugin_broken", "plugin 'test_plugin_broken' could not be imported: "
                       "RuntimeError: boom")):
    with pytest.raises(ValueError, match=match):
      plugins.import_plugins(spec)
  sys.modules.pop("test_plugin_inproc", None)


def _env(tmp_path, cache):
  env = tiny_ppo.env(cache)
  env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tmp_path / 'plugins'}"
  return env


def test_a_plugin_loss_and_reward_train_from_the_command_line(tmp_path, tmp_path_factory):
  (tmp_path / "plugins").mkdir()
  (tmp_path / "plugins" / "my_fork_plugin.py").write_text(PLUGIN)
  inputs = tiny_ppo.write_inputs(tmp_path / "inputs")
  cache = tiny_ppo.cache_dir(tmp_path_factory)
  overrides = {**inputs, **tiny_ppo.ppo_overrides(2), "plugins": "my_fork_plugin",
               "ppo.policy_loss.name": "test_plugin_pg",
               "ppo.rewards.terms": "reward_model+0.5*test_plugin_reward"}
  work = str(tmp_path / "run")
  proc = subprocess.run(tiny_ppo.command(work, overrides), cwd=tiny_ppo.ROOT,
                        env=_env(tmp_path, cache), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [r for r in read_jsonl(os.path.join(work, "ppo", "metrics.jsonl"))
             if "reward_mean" in r]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["plugin_marker"] == 1.0   # the plugin's loss ran
    for key in ("pg_loss", "reward/reward_model", "reward/test_plugin_reward", "raw_score_mean"):
      assert np.isfinite(r[key]), key
    np.testing.assert_allclose(
        r["raw_score_mean"], r["reward/reward_model"] + 0.5 * r["reward/test_plugin_reward"],
        rtol=1e-5, atol=1e-6)

  # Without --config.plugins the name is unknown: one error line, exit status 2.
  overrides.pop("plugins")
  proc = subprocess.run(tiny_ppo.command(str(tmp_path / "run2"), overrides), cwd=tiny_ppo.ROOT,
                        env=_env(tmp_path, cache), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error:") and "unknown reward 'test_plugin_reward'" in proc.stderr
