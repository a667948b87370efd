"""The CLI's surface: help with examples, and a README that lists every command."""

from __future__ import annotations

import re

import typer

from conftest import REPO, qabox
from qabox.cli import app


def all_commands() -> dict:
    """Every leaf command, by its full name (``hosts trust``)."""
    found = {}

    def walk(command, prefix: str) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            found[prefix] = command

    walk(typer.main.get_command(app), "")
    return found


def test_every_command_has_help_with_an_example():
    for name, command in all_commands().items():
        assert "Example: qabox " in (command.help or ""), name


def test_readme_documents_every_command_and_option():
    readme = (REPO / "README.md").read_text()
    for name, command in all_commands().items():
        assert f"qabox {name}" in readme, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert opt in readme, f"{name} {opt}"


def test_readme_test_command_is_what_ci_runs():
    assert re.search(r"^(sudo )?scripts/test\b", (REPO / "README.md").read_text(), re.M)
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_version_and_module_entry():
    assert qabox("--version").stdout.startswith("qabox ")


def test_usage_errors_have_no_traceback():
    result = qabox("deploy")
    assert result.code == 2 and "Traceback" not in result.stdout + result.stderr
