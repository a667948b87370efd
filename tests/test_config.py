"""The app's configuration per env on a real lab host: a Flask app written as
Flask's docs write one (an app factory reading its settings from the
environment) gets `qabox config` values through a restart with no failed
request, and a secret never shows in argv, logs, status or errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import LAB, LAB_HOME, REPO, http_get, in_host, json_data, qabox
from test_supervision import LOAD

pytestmark = pytest.mark.usefixtures("lab")

SECRET = "pw-Zq81x=very secret\nsecond line"
GREETING = "greeting-Hq72"  # a value of this test's own, to look for in every process's argv
FACTORY = '''
import hashlib
import os

from flask import Flask


def create_app(test_config=None):
    app = Flask(__name__)
    app.config.from_mapping(SECRET_KEY=os.environ.get("SECRET_KEY", "dev"), GREETING="default")
    app.config.from_prefixed_env()  # FLASK_GREETING -> GREETING, as Flask's docs configure an app

    @app.get("/")
    def index():
        return app.config["GREETING"]

    @app.get("/key")
    def key():  # a digest only: the test compares, the app never shows its key
        return hashlib.sha256(app.config["SECRET_KEY"].encode()).hexdigest()

    @app.get("/env/<name>")
    def variable(name):
        return os.environ.get(name, "(unset)")

    return app
'''
TOML = '''[app]
entry = "wsgi:app"

[app.environment]
FLASK_GREETING = "from qabox.toml"
COLOR = "from qabox.toml"
LAYER = "from qabox.toml"
'''


@pytest.fixture
def flask_build(make_build):
    return make_build({"shop/__init__.py": FACTORY, "wsgi.py": "from shop import create_app\n\napp = create_app()\n",
                       "qabox.toml": TOML})


@pytest.fixture
def hosts_dir(tmp_path, monkeypatch, env_name):
    """lab1's hosts file with an [envs.NAME.environment] table for the test's env."""
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text((REPO / "hosts" / "lab1.toml").read_text() +
                                     f'\n[envs.{env_name}.environment]\nLAYER = "from the hosts file"\n')
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    return hosts


def config(*args, input=None, env=None):
    return qabox("config", *args, "--host", "lab1", "--env", env, input=input)


def get(port, path="/"):
    code, body = http_get("lab1", port, path)
    assert code == 200, body
    return body


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_set_from_stdin_restarts_with_no_failed_request_and_the_secret_never_shows(flask_build, env_name, port):
    assert qabox("deploy", flask_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    assert get(port) == "from qabox.toml" and get(port, "/key") == sha256("dev")
    load = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                             LOAD, str(port), "12"], stdout=subprocess.PIPE, text=True)
    assert load.stdout.readline() == "serving\n"
    started = time.monotonic()
    result = config("set", f"FLASK_GREETING={GREETING}", env=env_name)
    assert result.code == 0, result
    assert get(port) == GREETING
    seconds = time.monotonic() - started
    print(f"\nconfig set to serving the new value: {seconds:.2f} s")
    assert result.stdout.startswith(f"lab1/{env_name}: set FLASK_GREETING; release ") and "restarted (pid" in result.stdout
    during, done = [], threading.Event()

    def watch():  # every process's argv on the host while the secret is being set
        while not done.is_set():
            during.append(in_host("lab1", "ps", "axww").stdout)

    watcher = threading.Thread(target=watch)
    watcher.start()
    secret = config("set", "SECRET_KEY", input=SECRET + "\n", env=env_name)  # stdin is not a terminal here
    done.set()
    watcher.join()
    assert secret.code == 0 and SECRET not in secret.stdout + secret.stderr, secret
    assert get(port, "/key") == sha256(SECRET)  # the one trailing newline dropped, the one inside kept
    stats = json.loads(load.communicate(timeout=60)[0])
    assert stats["failed"] == 0 and {"from qabox.toml", GREETING} <= set(stats["bodies"]), stats

    masked = config("list", env=env_name)
    assert masked.code == 0 and SECRET.split("\n")[0] not in masked.stdout
    assert [line.split() for line in masked.stdout.splitlines()] == [
        ["NAME", "VALUE", "SOURCE"], ["COLOR", "********", "qabox.toml"], ["FLASK_GREETING", "********", "config"],
        ["LAYER", "********", "qabox.toml"], ["SECRET_KEY", "********", "config"]]
    shown = json_data(config("list", "--show", "--json", env=env_name).stdout)
    assert {v["name"]: v["value"] for v in shown["variables"]}["SECRET_KEY"] == SECRET
    assert {v["name"]: v["value"] for v in json_data(config("list", "--json", env=env_name).stdout)["variables"]} == {
        "COLOR": None, "FLASK_GREETING": None, "LAYER": None, "SECRET_KEY": None}

    errors = [config("set", f"BAD-NAME={SECRET}", env=env_name), config("set", f"PATH={SECRET}", env=env_name),
              config("set", f"OK={SECRET}", env="no/such"), config("unset", "QABOX_ENV", env=env_name)]
    assert all(e.code == 2 for e in errors), errors
    assert len(during) >= 2, during
    seen = [
        in_host("lab1", "ps", "axww").stdout, *during,
        in_host("lab1", "sh", "-c", f"cat {LAB_HOME}/.qabox/envs/{env_name}/logs/*").stdout,
        qabox("logs", "--host", "lab1", "--env", env_name, "-n", "1000").stdout,
        qabox("status", "--host", "lab1", "--env", env_name, "--json").stdout,
        qabox("releases", "--host", "lab1", "--env", env_name, "--json").stdout,
        *(e.stdout + e.stderr for e in errors),
    ]
    for text in seen:
        assert SECRET.split("\n")[0] not in text and "very secret" not in text
    assert GREETING not in seen[0]  # no value in any process's argv
    mode = in_host("lab1", "stat", "-c", "%a", f"{LAB_HOME}/.qabox/envs/{env_name}/config.json").stdout.strip()
    assert mode == "600"


def test_a_change_the_app_does_not_start_with_is_not_kept(flask_build, env_name, port):
    """FLASK_GREETING=1 is read as JSON, an int: the view's return fails every probe with a 500."""
    assert qabox("deploy", flask_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    assert config("set", "COLOR=kept", env=env_name).code == 0
    result = config("set", "FLASK_GREETING=1", "COLOR=changed", env=env_name)
    assert result.code == 6 and result.stderr.splitlines()[-1].startswith(
        "qabox: error: lab1: the app did not start with the new configuration, so the change was not kept: "
        "release "), result
    assert result.stderr.splitlines()[-1].endswith(
        "did not pass its health check when started again (health check answered HTTP 500 on every probe for "
        "3 s (up is 200-399)): its running process keeps serving"), result
    assert get(port) == "from qabox.toml" and get(port, "/env/COLOR") == "kept"
    shown = json_data(config("list", "--show", "--json", env=env_name).stdout)["variables"]
    listed = {v["name"]: (v["value"], v["source"]) for v in shown}
    assert listed["COLOR"] == ("kept", "config")
    assert listed["FLASK_GREETING"] == ("from qabox.toml", "qabox.toml")  # the next deploy or restart gets no 1
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0


def test_precedence_from_file_no_restart_and_unset(flask_build, env_name, port, hosts_dir, tmp_path):
    early = config("set", "COLOR=from config, before any deploy", env=env_name)
    assert early.code == 0 and "nothing is deployed yet: the first deploy gets it" in early.stdout, early
    assert qabox("deploy", flask_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    assert get(port, "/env/COLOR") == "from config, before any deploy"
    assert get(port, "/env/LAYER") == "from the hosts file"  # qabox.toml < hosts file

    dotenv = tmp_path / ".env"
    dotenv.write_text('# a comment\nexport LAYER="from .env"\nMULTI="one=1\ntwo=2"\nEMPTY=\nLITERAL=${HOME}\n')
    deferred = config("set", "--from-file", dotenv, "--no-restart", env=env_name)
    assert deferred.code == 0 and "not restarted (--no-restart)" in deferred.stdout, deferred
    assert get(port, "/env/LAYER") == "from the hosts file"  # not yet
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    assert get(port, "/env/LAYER") == "from .env" and get(port, "/env/MULTI") == "one=1\ntwo=2"
    assert get(port, "/env/EMPTY") == "" and get(port, "/env/LITERAL") == "${HOME}"

    unset = config("unset", "LAYER", "COLOR", "NEVER_SET", env=env_name)
    assert unset.code == 0 and f"lab1/{env_name}: not set: NEVER_SET" in unset.stdout, unset
    assert get(port, "/env/LAYER") == "from the hosts file" and get(port, "/env/COLOR") == "from qabox.toml"
    again = config("unset", "LAYER", env=env_name)
    assert again.code == 0 and again.stdout.endswith("nothing changed\n"), again


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, env_name):
    cases = {
        ("set", "1ABC=x"): "'1ABC' is not an environment variable name: use letters, digits and _, not starting "
                           "with a digit",
        ("set", "QABOX_DATA_DIR=x"): "QABOX_DATA_DIR is set by qabox itself (QABOX_*, PATH, PYTHON*, FLASK_DEBUG "
                                     "and Werkzeug's switches are reserved): pick another name",
        ("set", "PYTHONPATH=/tmp"): "PYTHONPATH is set by qabox itself",
        ("set",): "nothing to set: name KEY=VALUE, a KEY (its value is then asked for) or --from-file FILE",
        ("set", "A", "B"): "only one KEY without =VALUE at a time (A, B)",
        ("set", "--from-file", tmp_path / "none.env"): "there is no such file",
    }
    (tmp_path / "novalue.env").write_text("GOOD=1\nLONELY\n")
    cases[("set", "--from-file", tmp_path / "novalue.env")] = "LONELY has no value: write LONELY=VALUE there"
    (tmp_path / "open-quote.env").write_text('GOOD=1\nSECRET_KEY="pw-never-shown\n')
    cases[("set", "--from-file", tmp_path / "open-quote.env")] = "line 2 is not KEY=VALUE (a quote left open?)"
    inputs = {("set", "EMPTY_STDIN"): ("\n", "no value for EMPTY_STDIN came on stdin: pipe it in, or write "
                                             "EMPTY_STDIN= for an empty one"),
              ("set", "NUL_VALUE"): ("pw-never-shown\0x", "the value of NUL_VALUE holds a NUL character")}
    cases.update((args, message) for args, (_, message) in inputs.items())
    for args, message in cases.items():
        result = config(*args, env=env_name, input=inputs.get(args, (None,))[0])
        assert "pw-never-shown" not in result.stderr, result
        assert result.code == 2 and result.stdout == "", (args, result)
        assert result.stderr.startswith("qabox: error: ") and message in result.stderr, (args, result)
        assert len(result.stderr.splitlines()) == 1, result
    listed = config("list", "--json", env=env_name)
    assert listed.code == 0 and json_data(listed.stdout)["variables"] == [], listed
