"""The README stays true: two set-up commands, the CI runs the second, every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import settings_table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_exactly_two_setup_commands_one_runs_the_fleet_one_the_tests() -> None:
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "fleet up --demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [name for name, _, _ in settings_table() if f"`{name}`" not in README]
    assert not missing, f"README lacks {missing}"
