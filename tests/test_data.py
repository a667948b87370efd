"""Data that follows the env, end to end on the lab: an app written like Flask's tutorial
flaskr (an app factory, its SQLite database in ``app.instance_path``, created on first
request) keeps what was written through it across a redeploy, a rollback and pruning;
``rollback --with-data`` brings back the earlier data; and the snapshot a deploy takes is
consistent while the app writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import LAB, LAB_HOME, http_get, in_host, json_data, qabox

pytestmark = pytest.mark.usefixtures("lab")

FLASKR = '''
import os
import sqlite3

from flask import Flask, g, request


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(SECRET_KEY="dev", DATABASE=os.path.join(app.instance_path, "flaskr.sqlite"))
    os.makedirs(app.instance_path, exist_ok=True)

    def get_db():
        if "db" not in g:
            g.db = sqlite3.connect(app.config["DATABASE"], timeout=30)
            g.db.execute("CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT)")
        return g.db

    @app.teardown_appcontext
    def close_db(e=None):
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.post("/post")
    def post():
        db = get_db()
        db.execute("INSERT INTO post (body) VALUES (?)", (request.form["body"],))
        db.commit()
        return "ok"

    @app.get("/")
    def index():
        return ",".join(row[0] for row in get_db().execute("SELECT body FROM post ORDER BY id"))

    return app
'''

# Posts w0, w1, ... one after another until its stdin closes; then prints how many went in and failed.
WRITER = """
import sys, threading, urllib.parse, urllib.request
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
sent = failed = 0
print("writing", flush=True)
while not done.is_set():
    body = urllib.parse.urlencode({"body": "w%d" % sent}).encode()
    try:
        urllib.request.urlopen("http://127.0.0.1:PORT/post", body, timeout=10).read()
        sent += 1
    except OSError:
        failed += 1
print(sent, failed)
"""

# The rows of a snapshot's database, after SQLite's own integrity check.
READ_SNAPSHOT = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("PRAGMA integrity_check").fetchone()[0])
print(",".join(r[0] for r in db.execute("SELECT body FROM post ORDER BY id")))
"""


def flaskr(make_build, n: int):
    return make_build({"flaskr/__init__.py": FLASKR + f"\n# v{n}\n", "wsgi.py": "from flaskr import create_app\n"
                       "app = create_app()\n"})


def post(port: int, body: str) -> None:
    done = in_host("lab1", "curl", "-sf", "-d", f"body={body}", f"http://127.0.0.1:{port}/post")
    assert done.returncode == 0 and done.stdout == "ok", done


def posts(port: int) -> list:
    code, body = http_get("lab1", port, "/")
    assert code == 200, body
    return body.split(",") if body else []


def deploy(build, env, port):
    result = qabox("deploy", build, "--host", "lab1", "--env", env, "--port", port, "--json")
    assert result.code == 0, result
    return json_data(result.stdout)


def rollback(env, *extra):
    result = qabox("rollback", "--host", "lab1", "--env", env, *extra)
    assert result.code == 0, result
    return result.stdout


def test_flaskr_data_follows_the_env_and_rollback_with_data_brings_back_the_earlier_data(
        make_build, env_name, port, tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("keep = 2\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    env_dir = f"{LAB_HOME}/.qabox/envs/{env_name}"
    v1 = deploy(flaskr(make_build, 1), env_name, port)["release"]
    post(port, "first")

    # a redeploy while the app writes: the data stays, and the snapshot taken before it is consistent
    writer = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                               WRITER.replace("PORT", str(port))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "writing"
    try:
        v2 = deploy(flaskr(make_build, 2), env_name, port)["release"]
    finally:
        writer.stdin.close()
    sent, failed = map(int, writer.stdout.read().split())
    assert writer.wait(30) == 0 and sent > 10 and failed == 0, (sent, failed)
    assert posts(port) == ["first"] + [f"w{i}" for i in range(sent)]
    snapshot = in_host("lab1", "/usr/bin/python3", "-c", READ_SNAPSHOT,
                       f"{env_dir}/snapshots/{v2}/data/instance/flaskr.sqlite")
    check, rows = snapshot.stdout.split("\n")[:2]
    rows = rows.split(",")
    assert check == "ok" and rows == ["first"] + [f"w{i}" for i in range(len(rows) - 1)], snapshot
    post(port, "after v2")

    # a rollback keeps the env's data
    assert f"rolled back to release {v1}" in rollback(env_name)
    assert posts(port)[-1] == "after v2"

    # pruning (keep = 2) removes v1 and its snapshot, never the data
    v3 = deploy(flaskr(make_build, 3), env_name, port)
    assert v3["pruned"] == [v1]
    for sub in ("releases", "snapshots"):
        assert in_host("lab1", "ls", f"{env_dir}/{sub}").stdout.split() == [v2, v3["release"]]
    assert posts(port)[-1] == "after v2"
    post(port, "after v3")

    # --with-data: back to v2, with the data as it was when v2 was left (before v3 was deployed)
    said = rollback(env_name, "--with-data")
    assert f"rolled back to release {v2}" in said and f"with the data from before release {v3['release']}" in said
    assert posts(port)[-1] == "after v2" and "after v3" not in posts(port)
    assert in_host("lab1", "ls", "-A", f"{env_dir}/data").stdout.split() == ["instance"]  # no restore left over
