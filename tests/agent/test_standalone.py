"""The agent stands alone on the host: standard library only, relative imports only
(nothing of qabox's client side, paramiko, typer or rich), in python 3.6's syntax."""

from __future__ import annotations

import ast
import sys

from conftest import REPO

SRC = REPO / "src" / "qabox"


def agent_files() -> list:
    """The host side: every module of the package src/qabox/agent/."""
    files = sorted((SRC / "agent").rglob("*.py"))
    assert files and all(f.is_file() for f in files), files
    return files


# The app servers run in the release's virtualenv, where the build's wheels bring them: the
# agent imports each there, in a function of its own server's modules, never when it loads
# (Werkzeug in serve.py, which also serves [app] static with it for the other servers, and in
# debug.py: `qabox debug` runs the app under Werkzeug's debugger, whatever [app] server says).
APP_SERVERS = {"werkzeug": ("serve.py", "debug.py"), "waitress": ("serve_waitress.py", "waitress_compat.py"),
               "gunicorn": ("serve_gunicorn.py",)}


def imports(path) -> list:
    """(line, level, module, in a function) of each import in a file: level 0 is absolute."""
    found = []

    def visit(node, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, 0, alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.level, node.module or "", in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def outside(path, src=SRC) -> list:
    """What a module under ``src`` imports from outside the standard library and the agent package."""
    inside = len(path.relative_to(src).parts) - 1  # packages up that are still the agent's
    wrong = []
    for line, level, module, in_function in imports(path):
        top = module.split(".")[0]
        if level > inside or not level and top not in sys.stdlib_module_names and not (
                top in APP_SERVERS and in_function and path.name in APP_SERVERS[top]):
            wrong.append(f"{path.relative_to(src)}:{line}: {'.' * level}{module}")
    return wrong


def test_the_agent_imports_only_the_standard_library_and_itself():
    assert [line for path in agent_files() for line in outside(path)] == []


def test_the_check_tells_the_client_side_from_the_standard_library(tmp_path):
    probe = tmp_path / "agent" / "probe.py"  # as if it were a module of the agent package
    probe.parent.mkdir()
    probe.write_text("import json, os.path\nfrom qabox.build import inspect\nimport paramiko\n"
                     "from rich import print\nfrom .. import cli\nfrom . import files\nimport werkzeug\n"
                     "def serve():\n    from werkzeug.serving import ThreadedWSGIServer\n    import gunicorn\n")
    assert outside(probe, tmp_path) == [f"agent/probe.py:{n}: {what}" for n, what in (
        (2, "qabox.build"), (3, "paramiko"), (4, "rich"), (5, ".."), (7, "werkzeug"), (9, "werkzeug.serving"),
        (10, "gunicorn"))]  # not a server's module: not even in a function
    own = tmp_path / "agent" / "serve_gunicorn.py"
    own.write_text("import gunicorn\ndef serve():\n    import gunicorn.app.base\n    import waitress\n")
    assert outside(own, tmp_path) == ["agent/serve_gunicorn.py:1: gunicorn", "agent/serve_gunicorn.py:4: waitress"]


def test_the_agent_is_python36_syntax():
    for path in agent_files():
        ast.parse(path.read_text(), str(path), feature_version=(3, 6))
