"""paramiko's internals behind qabox.paramiko_compat: a paramiko that lacks one
is refused in one line, and the tunnel works on the oldest and the newest
paramiko pyproject.toml allows (each in a virtualenv of its own, cached in
.cache/paramiko/)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import paramiko
import pytest

from conftest import REPO
from qabox import paramiko_compat
from qabox.paramiko_compat import IncompatibleParamiko, check

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

OLDEST, NEWEST = "3.4.1", "5.1.0"  # NEWEST: the newest 5.x on the index; bump it with new releases
# What runs under each of them: the tunnel's data path, and a link that dies under it.
SUITE = ["tests/test_paramiko_compat.py", "tests/test_forward.py",
         "tests/test_tunnel.py::test_tunnel_survives_its_sshd_session_killed"]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def renamed_in_init(cls, name: str):
    """cls.__init__ that stores ``name`` under another name, as a paramiko that renamed it would."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        setattr(self, name + "_renamed", self.__dict__.pop(name))

    return __init__


@pytest.mark.parametrize("owner, name", [(paramiko.Channel, "_check_add_window"),  # a method
                                         (paramiko.Transport, "_channel_handler_table"),  # a class attribute
                                         (paramiko.Transport, "clear_to_send_lock"),  # set in __init__
                                         (paramiko.Channel, "lock")])
def test_a_missing_internal_is_refused_in_one_line(monkeypatch, owner, name):
    if name in vars(owner):
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, "__init__", renamed_in_init(owner, name))
    monkeypatch.setattr(paramiko, "__version__", "6.0.0")
    with pytest.raises(IncompatibleParamiko) as e:
        check()
    assert e.value.message == (f"qabox needs paramiko 3.4.1 to 5.x (this is paramiko 6.0.0: {owner.__name__}.{name} "
                               f"is gone): pip install 'paramiko>=3.4.1,<6'")


def test_this_paramiko_has_every_internal():
    check()


def test_the_cli_shows_it_as_one_line():
    """forward.py is imported lazily, inside the command's error reporting."""
    code = ("import sys, paramiko; del paramiko.Channel._feed; paramiko.__version__ = '6.0.0'; "
            "from qabox.cli import main; sys.argv = ['qabox', 'tunnels']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ("qabox: error: qabox needs paramiko 3.4.1 to 5.x (this is paramiko 6.0.0: Channel._feed "
                           "is gone): pip install 'paramiko>=3.4.1,<6'\n")


def test_invoke_loads_only_for_match_exec(tmp_path):
    """paramiko imports invoke for ssh_config's `Match exec` only: qabox defers it, and the line still works."""
    if importlib.util.find_spec("invoke") is None:
        pytest.skip("invoke is not installed with this paramiko")
    config = tmp_path / "ssh_config"
    config.write_text('Match exec "test 1 = 1"\n  User matched\nHost *\n  Port 2222\n')
    code = ("import sys; from qabox import ssh; loaded = 'invoke.tasks' in sys.modules; "
            "import paramiko; c = paramiko.SSHConfig.from_path(sys.argv[1]).lookup('box'); "
            "print(loaded, c['user'], c['port'], 'invoke.tasks' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "matched", "2222", "True"], out


def test_pyproject_pins_what_the_check_names():
    assert f"paramiko{paramiko_compat.SUPPORTED}" in [d.partition(" ")[0] for d in PROJECT["dependencies"]]
    low, high = paramiko_compat.SUPPORTED.split(",")
    assert (f">={OLDEST}", f"<{int(NEWEST.split('.')[0]) + 1}") == (low, high)


@pytest.mark.network
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_tunnel_works_with(version, lab):
    python = paramiko_venv(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO / "src")
    found = subprocess.run([str(python), "-c", "import paramiko; print(paramiko.__version__)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == version, found
    proc = subprocess.run([str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not network", *SUITE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def paramiko_venv(version: str) -> Path:
    """A virtualenv with that paramiko, qabox's other dependencies and pytest (qabox itself
    comes from src/ on PYTHONPATH). Made once per requirement list, in a temp dir renamed
    into place, so an interrupted install is never taken for a complete one."""
    requirements = [d for d in PROJECT["dependencies"] if not d.startswith("paramiko")]
    requirements += [f"paramiko=={version}"] + [d for d in PROJECT["optional-dependencies"]["test"]
                                                if d.startswith("pytest")]
    venv = REPO / ".cache" / "paramiko" / f"{version}-py{sys.version_info[0]}.{sys.version_info[1]}"
    marker = "\n".join(requirements) + "\n"
    if (venv / ".complete").is_file() and (venv / ".complete").read_text() == marker:
        return venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=venv.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=120)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                       check=True, timeout=600)
        (tmp / ".complete").write_text(marker)
        shutil.rmtree(venv, ignore_errors=True)  # one made for another requirement list
        os.rename(tmp, venv)
    except OSError:
        if not (venv / ".complete").is_file():  # not a concurrent run winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return venv / "bin" / "python"
