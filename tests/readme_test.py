"""Checks of README.md claims that the code can verify."""

import pathlib
import re

from rlhf_jax import advantages, critics, kl, losses, mismatch, preference_losses, rewards

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
REGISTRIES = (losses.POLICY_LOSSES, losses.VALUE_LOSSES, advantages.ADVANTAGE_ESTIMATORS,
              kl.KL_ESTIMATORS, kl.KL_CONTROLLERS, critics.CRITICS, rewards.REWARDS,
              mismatch.CORRECTIONS, preference_losses.PREFERENCE_LOSSES)


def _registered_names_table() -> dict[str, set[str]]:
  """{kind: names} from the rows of the README's "Registered names" table."""
  section = README.read_text().split("## Registered names\n", 1)[1].split("\n## ", 1)[0]
  table = {}
  for line in section.splitlines():
    row = re.fullmatch(r"\| ([^|]+) \| `([^`]+)` \|[^|]+\|[^|]+\|", line)
    if row:
      table.setdefault(row[1], set()).add(row[2])
  return table


def test_registered_names_table_lists_exactly_the_registered_names():
  # Names starting with "test_" are registered by the tests themselves.
  registered = {reg.kind: {n for n in reg.names() if not n.startswith("test_")}
                for reg in REGISTRIES}
  assert _registered_names_table() == registered
