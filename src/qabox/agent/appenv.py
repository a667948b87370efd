"""What every process of an app runs with: the release's virtualenv python and
the environment it sees (the app server, and later one-off commands and
release hooks alike)."""

import os

from .config import environment
from .envs import Env
from .rules import DEBUG_SWITCHES


def venv_python(env: Env, info: dict) -> str:
    """The python of a release's virtualenv (``info`` is its release.json)."""
    return env.path("venvs", info["venv"], "bin", "python")


def app_environ(env: Env, release: str, info: dict) -> dict:
    """The environment of a process of the app: the agent's own, less the
    debugger's switches, then the app's configuration (the release's qabox.toml
    defaults < the hosts file's < ``qabox config``'s), then the env's data dir
    and the venv first on PATH (names configuration may not set)."""
    python = venv_python(env, info)
    environ = {key: value for key, value in os.environ.items() if key not in DEBUG_SWITCHES}
    environ.update(environment(env, info))
    environ.update(
        QABOX_DATA_DIR=env.path("data"),
        QABOX_ENV=env.name,
        QABOX_RELEASE=release,
        PYTHONUNBUFFERED="1",
        PATH=os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
    )
    return environ
