"""What every process of an app runs with: the release's virtualenv python and
the environment it sees (the app server, and later one-off commands and
release hooks alike)."""

import os

from .envs import Env

NEVER_PASSED = ("FLASK_DEBUG", "WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD")  # debugger or reloader switches


def venv_python(env: Env, info: dict) -> str:
    """The python of a release's virtualenv (``info`` is its release.json)."""
    return env.path("venvs", info["venv"], "bin", "python")


def app_environ(env: Env, release: str, info: dict) -> dict:
    """The environment of a process of the app: the agent's own, less the
    debugger's switches, with the env's data dir and the venv first on PATH."""
    python = venv_python(env, info)
    environ = {key: value for key, value in os.environ.items() if key not in NEVER_PASSED}
    environ.update(
        QABOX_DATA_DIR=env.path("data"),
        QABOX_ENV=env.name,
        QABOX_RELEASE=release,
        PYTHONUNBUFFERED="1",
        PATH=os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
    )
    return environ
