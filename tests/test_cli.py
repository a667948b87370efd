"""The CLI's surface: help with examples, and a README that lists every command."""

from __future__ import annotations

import re
import subprocess
import sys

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


def test_readme_layout_names_every_module():
    """The layout section a newcomer reads is the tree: each package's modules, none left out."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("Layout, by what each part owns:"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    for package in ("src/qabox", "src/qabox/cli", "src/qabox/commands", "src/qabox/agent"):
        (line,) = [line for line in layout.splitlines() if line.startswith(package + "/ ")]
        for module in sorted((REPO / package).glob("*.py")):
            if module.stem not in ("__init__", "__main__"):
                assert re.search(rf"\b{module.stem}\b", layout), f"{package}/{module.name} is not in the README's layout"


def test_version_and_module_entry():
    assert qabox("--version").stdout.startswith("qabox ")
    proc = subprocess.run([sys.executable, "-m", "qabox", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc
    assert "Usage: qabox [OPTIONS] COMMAND" in proc.stdout, proc.stdout
    assert all(f" {name} " in proc.stdout for name in ("deploy", "status", "tunnel")), proc.stdout


def test_usage_errors_have_no_traceback():
    result = qabox("deploy")
    assert result.code == 2 and "Traceback" not in result.stdout + result.stderr
