"""Virtualenvs from the host's wheel cache, with the agent run here as qabox runs
it: a second env with equal requirements runs no pip, an overlapping set installs
only the new wheels, the cache is collected once no venv of any env links an entry,
and a deploy killed mid-install leaves nothing a later one trusts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Host, free_port, local_get, wait_until, wsgi_build
from qabox.pack import pack

PYTHON36 = "/root/.pyenv/versions/3.6.15/bin/python"  # the oldest python a host may have, pip 18.1
pytestmark = pytest.mark.network  # Flask's wheels, downloaded once into .cache/wheels
FLASK_APP = "import flask\napp = flask.Flask(__name__)\n@app.get('/')\ndef index():\n    return flask.__file__\n"
WERKZEUG_APP = ("import werkzeug\ndef app(environ, start_response):\n"
                "    start_response('200 OK', [])\n    return [werkzeug.__file__.encode()]\n")


@pytest.fixture
def builds(tmp_path, wheels):
    """A Flask app with all seven wheels, and a bare WSGI app needing werkzeug's two only."""
    made = {}
    for name, app, req, subset in (("flask", FLASK_APP, "flask>=3.0", None),
                                   ("werkzeug", WERKZEUG_APP, "werkzeug", ("werkzeug", "markupsafe"))):
        src = tmp_path / name
        src.mkdir()
        (src / "wsgi.py").write_text(app)
        (src / "requirements.txt").write_text(req + "\n")
        chosen = [w for w in wheels if subset is None or w.name.split("-")[0].lower() in subset]
        made[name] = pack(src, tmp_path / f"{name}.tar.gz", wheels=chosen)
    return made


def deployed(host, build: Path, env: str, port: int, **request) -> dict:
    result = host.deploy(build, env, port, **request)
    assert result["ok"], (result, host.stderr)
    return result["data"]


def cache_entries(host) -> list[str]:
    (tag,) = [p.parent for p in (Path(host.base) / "wheelcache").glob("*/sets")]
    return sorted(p.name for p in tag.iterdir() if p.name != "sets")


def venv_of(host, env: str) -> Path:
    release = json.loads((Path(host.base) / "envs" / env / "current" / "release.json").read_text())
    return Path(host.base) / "envs" / env / "venvs" / release["venv"]


def test_a_second_env_with_equal_requirements_links_every_wheel_and_runs_no_pip(host, builds):
    first = deployed(host, builds["flask"], "one", free_port())
    assert first["venv_created"] and (first["wheels_linked"], first["wheels_installed"]) == (0, 7), first
    port = free_port()
    second = deployed(host, builds["flask"], "two", port)
    assert second["venv_created"] and (second["wheels_linked"], second["wheels_installed"]) == (7, 0), second
    venv = venv_of(host, "two")
    code, path = local_get(port)
    assert code == 200 and path.startswith(str(venv) + "/lib/"), path  # imported from its own venv
    theirs = venv_of(host, "one") / path[len(str(venv)) + 1:]
    assert os.stat(path).st_ino == os.stat(theirs).st_ino  # one file on disk, linked in both
    assert not os.stat(path).st_mode & 0o222  # an app writing into its venv cannot change the other's
    script = (venv / "bin" / "flask").read_text()
    assert script.startswith(f"#!{venv}/bin/python\n"), script  # written for this venv, not linked
    flask = subprocess.run([str(venv / "bin" / "flask"), "--version"], capture_output=True, text=True)
    assert flask.returncode == 0 and "Flask 3" in flask.stdout, flask


def test_an_overlapping_requirement_set_installs_only_the_new_wheels(host, builds):
    first = deployed(host, builds["werkzeug"], "one", free_port())
    assert (first["wheels_linked"], first["wheels_installed"]) == (0, 2), first
    port = free_port()
    second = deployed(host, builds["flask"], "two", port)
    assert (second["wheels_linked"], second["wheels_installed"]) == (2, 5), second
    code, path = local_get(port)
    assert code == 200 and path.startswith(str(venv_of(host, "two")) + "/lib/"), path
    assert len(cache_entries(host)) == 7


def test_cached_wheels_go_only_once_no_kept_release_of_any_env_uses_them(host, builds):
    deployed(host, builds["flask"], "one", free_port())
    deployed(host, builds["flask"], "two", free_port())
    flask_venv = venv_of(host, "one")
    deployed(host, builds["werkzeug"], "one", free_port(), keep=1)
    assert not flask_venv.exists()  # env one's flask release was pruned, and its venv
    assert len(cache_entries(host)) == 7  # env two's release still links them all
    deployed(host, builds["werkzeug"], "two", free_port(), keep=1)
    kept = [hashlib.sha256(w.read_bytes()).hexdigest() for w in (Path(host.base) / "envs" / "two" / "current"
                                                                 / "wheels").iterdir()]
    assert cache_entries(host) == sorted(kept)  # werkzeug and markupsafe, which both envs link
    sets = [json.loads(p.read_text()) for p in (Path(host.base) / "wheelcache").glob("*/sets/*.json")]
    assert sets == [sorted(kept)]  # the flask set named deleted entries: gone too


def test_a_deploy_killed_mid_install_leaves_no_venv_a_later_one_trusts(host, builds):
    build = builds["flask"]
    agent, _ = host.start_deploy(build, "one", free_port())
    for line in agent.stdout:
        if json.loads(line).get("progress") == "installing requirements":
            break
    assert wait_until(host.processes, 10)  # pip, whose command line names the venv under the base
    agent.kill()
    agent.wait(10)
    host.kill_all()
    port = free_port()
    again = deployed(host, build, "one", port)
    assert again["venv_created"] and again["wheels_installed"] == 7, again
    code, path = local_get(port)
    assert code == 200 and path.startswith(str(venv_of(host, "one")) + "/lib/"), path
    assert not list((Path(host.base) / "wheelcache").glob("*/.*.tmp"))


@pytest.mark.skipif(not os.path.exists(PYTHON36), reason=f"no {PYTHON36} on this machine")
def test_python_3_6_and_its_pip_18_link_a_second_env_too(agent_cmd, tmp_path):
    (tmp_path / "host").mkdir()
    host = Host(agent_cmd(PYTHON36), tmp_path / "host")
    build = wsgi_build(tmp_path / "v1.tar.gz", "v1", python="3.6")
    try:
        first = deployed(host, build, "one", free_port())
        assert first["wheels_installed"] >= 2 and first["wheels_linked"] == 0, first
        port = free_port()
        second = deployed(host, build, "two", port)
        assert (second["wheels_linked"], second["wheels_installed"]) == (first["wheels_installed"], 0), second
        assert local_get(port) == (200, "v1")
    finally:
        host.kill_all()


def test_two_envs_deploying_at_once_both_get_whole_venvs(host, builds):
    from concurrent.futures import ThreadPoolExecutor

    ports = {"one": free_port(), "two": free_port()}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda env: deployed(host, builds["flask"], env, ports[env]), ports))
    assert all(r["wheels_installed"] + r["wheels_linked"] == 7 for r in results), results  # whoever came first
    for env, port in ports.items():
        code, path = local_get(port)
        assert code == 200 and path.startswith(str(venv_of(host, env)) + "/lib/"), path
    assert len(cache_entries(host)) == 7 and not list((Path(host.base) / "wheelcache").glob("*/.*"))
