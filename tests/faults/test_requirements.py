"""A build's requirements may not run code or reach the network at deploy time:
only named requirements, installed from wheels. Checked by qabox before
anything is sent, and by the host again (here with qabox's own check switched
off, as an old or hostile client would be)."""

from __future__ import annotations

import io
import tarfile

import pytest

from conftest import LAB_HOME, http_get, in_host, qabox
from qabox.agent import rules

pytestmark = pytest.mark.usefixtures("lab")
APP = "from flask import Flask\napp = Flask(__name__)\n@app.get('/')\ndef index():\n    return 'ok'\n"

# An in-tree build backend needs nothing from an index: pip would run it as is.
BACKEND = """
import os
open(os.path.expanduser("~/sdist-ran"), "w").write("the build's code ran at deploy time")
def build_wheel(*args, **kwargs):
    raise SystemExit("no")
"""
PYPROJECT = """
[build-system]
requires = []
build-backend = "evil_backend"
backend-path = ["."]
"""


def sdist(tmp_path):
    """evil-1.0.tar.gz: a source distribution whose build backend leaves a mark."""
    path = tmp_path / "evil-1.0.tar.gz"
    files = {"evil-1.0/evil_backend.py": BACKEND, "evil-1.0/pyproject.toml": PYPROJECT,
             "evil-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.mark.parametrize("line", ["pkg @ http://198.18.1.1:9/pkg-1.0-py3-none-any.whl", "-r /etc/passwd",
                                  "-e .", "--index-url http://198.18.1.1:9/simple", "./vendored"])
def test_the_client_refuses_requirements_that_reach_beyond_the_build(make_build, line):
    build = make_build({"wsgi.py": APP, "requirements.txt": f"flask>=3.0\n{line}\n"})
    result = qabox("deploy", build, "--host", "lab1", "--env", "never", "--port", 1)
    assert result.code == 5 and f"requirements.txt:2: {line[:80]}" in result.stderr, result
    assert "root:" not in result.stderr


@pytest.mark.parametrize("line", ["pkg @ http://198.18.1.1:9/pkg-1.0-py3-none-any.whl", "-r /etc/passwd"])
def test_the_host_refuses_them_too(make_build, env_name, port, monkeypatch, line):
    assert qabox("deploy", make_build({"wsgi.py": APP}), "--host", "lab1", "--env", env_name, "--port", port).code == 0
    monkeypatch.setattr(rules, "requirements_problems", lambda read, *a: [])  # the client no longer checks
    build = make_build({"wsgi.py": APP, "requirements.txt": f"flask>=3.0\n{line}\n"})
    result = qabox("deploy", build, "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 6 and "the build's requirements are refused: requirements.txt:2:" in result.stderr, result
    assert "root:x:0" not in result.stderr
    assert http_get("lab1", port, "/") == (200, "ok")  # the current release keeps serving


def test_an_sdist_in_the_wheelhouse_is_never_built_on_the_host(make_build, wheels, env_name, port, tmp_path):
    from qabox.pack import pack

    src = tmp_path / "evil-src"
    src.mkdir()
    (src / "wsgi.py").write_text(APP)
    (src / "requirements.txt").write_text("flask>=3.0\nevil\n")
    build = pack(src, tmp_path / "evil.tar.gz", wheels=list(wheels) + [sdist(tmp_path)])
    in_host("lab1", "rm", "-f", f"{LAB_HOME}/sdist-ran")
    result = qabox("deploy", build, "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 6 and "could not install the build's requirements.txt" in result.stderr, result
    assert in_host("lab1", "test", "-e", f"{LAB_HOME}/sdist-ran").returncode != 0  # setup.py never ran
