"""``qabox run`` and release hooks end to end on the lab: a Flask app with a factory
whose database an ``init-db`` hook makes in the env's data dir (Flask's tutorial
shape), one-off commands through the real CLI process, with and without a pty."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import LAB_USER, REPO, http_get, in_host, json_data, qabox, remove_env, wait_until
from qabox.pack import pack

pytestmark = pytest.mark.usefixtures("lab")

FLASKR = {
    "flaskr/__init__.py": '''
import os
import sqlite3

import click
from flask import Flask, current_app


def get_db():
    return sqlite3.connect(current_app.config["DATABASE"])


def create_app(test_config=None):
    app = Flask(__name__)
    app.config["DATABASE"] = os.path.join(os.environ.get("QABOX_DATA_DIR", app.instance_path), "flaskr.sqlite")

    @app.route("/")
    def index():
        return ", ".join(row[0] for row in get_db().execute("SELECT title FROM post ORDER BY id"))

    @app.cli.command("init-db")
    def init_db():
        db = get_db()
        db.executescript("DROP TABLE IF EXISTS post; CREATE TABLE post (id INTEGER PRIMARY KEY, title TEXT);"
                         "INSERT INTO post (title) VALUES ('hello from init-db');")
        db.commit()
        click.echo("Initialized the database.")

    return app
''',
    "wsgi.py": "from flaskr import create_app\n\napp = create_app()\n",
    "requirements.txt": "flask>=3.0\n",
}
INIT_DB = '[app]\nentry = "wsgi:app"\nrelease = "flask --app flaskr init-db"\n'


@pytest.fixture(scope="module")
def flaskr(tmp_path_factory, wheels):
    """flaskr_build(qabox_toml) -> a build of the Flask app with that qabox.toml."""
    top = tmp_path_factory.mktemp("flaskr")

    def build(toml: str, name: str) -> Path:
        src = top / name
        for rel, text in {**FLASKR, "qabox.toml": toml}.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        return pack(src, top / f"{name}.tar.gz", wheels=wheels)

    return build


@pytest.fixture(scope="module")
def deployed(flaskr, lab):
    """flaskr deployed to an env of this module's own on lab1, its init-db hook run."""
    env, port = f"r{os.getpid() % 1000}", 9090 + os.getpid() % 7
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QABOX_SSH_CONFIG", str(lab / "ssh_config"))
        patch.setenv("QABOX_HOSTS_DIR", str(REPO / "hosts"))
        started = time.monotonic()
        result = qabox("deploy", flaskr(INIT_DB, "init-db"), "--host", "lab1", "--env", env, "--port", port)
        assert result.code == 0, result
    yield {"env": env, "port": port, "seconds": time.monotonic() - started}
    remove_env("lab1", env)


def run(env: str, *argv: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """``qabox run`` as a user types it, in a process of its own, without a terminal."""
    return subprocess.run([sys.executable, "-m", "qabox", "run", "--host", "lab1", "--env", env, "--", *argv],
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=60)


def test_a_release_hook_makes_the_factory_apps_database_in_the_data_dir_before_it_serves(deployed):
    assert http_get("lab1", deployed["port"]) == (200, "hello from init-db")
    logs = qabox("logs", "--host", "lab1", "--env", deployed["env"], "-n", "200")
    assert "--- release hook: flask --app flaskr init-db ---" in logs.stdout
    assert "Initialized the database." in logs.stdout


def test_run_exits_with_the_commands_code_and_streams_stdout_and_stderr(deployed):
    done = run(deployed["env"], "python", "-c",
               "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)")
    assert done.returncode == 3 and done.stdout == b"to stdout\n" and done.stderr == b"to stderr\n", done
    assert run(deployed["env"], "python", "-c", "pass").returncode == 0
    killed = run(deployed["env"], "python", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == 128 + 9, killed


def test_run_passes_stdin_through_and_its_end(deployed):
    data = bytes(range(256)) * 1000
    done = run(deployed["env"], "python", "-c",
               "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data[::-1])", input=data)
    assert done.returncode == 0 and done.stdout == data[::-1], done.stderr


def test_run_sees_the_release_dir_its_venv_first_on_path_the_data_dir_and_the_apps_database(deployed):
    code = ("import os, shutil, sys, flaskr; print(os.getcwd()); print(shutil.which('python')); "
            "print(os.environ['QABOX_DATA_DIR']); print(sys.stdin.isatty()); "
            "app = flaskr.create_app(); print(app.test_client().get('/').get_data(as_text=True))")
    done = run(deployed["env"], "python", "-c", code)
    cwd, python, data_dir, tty, page = done.stdout.decode().splitlines()
    home = f"/home/{LAB_USER}/.qabox/envs/{deployed['env']}"
    assert cwd.startswith(f"{home}/releases/") and python.startswith(f"{home}/venvs/") and \
        python.endswith("/bin/python"), done
    assert data_dir == f"{home}/data" and tty == "False" and page == "hello from init-db"


def test_run_passes_arguments_as_they_are_never_through_a_shell(deployed):
    args = ["a b", "it's", '"quoted"', "x; touch /tmp/qabox-pwned", "$HOME", "`id`", "*", ""]
    done = run(deployed["env"], "python", "-c", "import sys; print(repr(sys.argv[1:]))", *args)
    assert done.returncode == 0 and done.stdout.decode() == repr(args) + "\n", done


def test_run_refuses_when_nothing_is_deployed(env_name, flaskr):
    done = run(env_name, "python", "-c", "pass")
    assert done.returncode == 6 and b"there is no env " + env_name.encode() in done.stderr, done
    failed = qabox("deploy", flaskr('[app]\nentry = "wsgi:app"\nrelease = "false"\n', "false"), "--host", "lab1",
                   "--env", env_name)
    assert failed.code == 6 and "release hook `false` failed (exit status 1)" in failed.stderr, failed
    done = run(env_name, "python", "-c", "pass")
    assert done.returncode == 6 and done.stdout == b"", done
    assert done.stderr.decode() == (f"qabox: error: lab1: nothing is deployed to env {env_name}: deploy a build "
                                    f"first, then run commands in it\n")


def in_terminal(argv: list[str], answers: dict[bytes, bytes], timeout: float = 60,
                resize: tuple[bytes, int, int] | None = None) -> tuple[int, bytes]:
    """Run ``argv`` on a real 80x24 pty here, typing each answer once its prompt shows (and
    resizing the terminal to ``resize``'s rows and columns once its text shows); (exit
    status, output)."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execv(argv[0], argv)
    output, deadline = b"", time.monotonic() + timeout
    pending = dict(answers)
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if resize and resize[0] in output:
                fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", resize[1], resize[2], 0, 0))  # SIGWINCH
                resize = None
            for prompt in list(pending):
                if prompt in output:
                    os.write(fd, pending.pop(prompt))
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def qabox_argv(env: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "qabox", "run", "--host", "lab1", "--env", env, "--", *argv]


def test_run_under_a_terminal_gets_a_tty_whose_prompts_read_what_is_typed(deployed):
    code = ("import os, sys; print('tty:', sys.stdin.isatty(), sys.stdout.isatty(), tuple(os.get_terminal_size())); "
            "name = input('Username: '); print('created', name); sys.exit(4)")
    status, output = in_terminal(qabox_argv(deployed["env"], "python", "-c", code), {b"Username: ": b"alice\r"})
    assert status == 4, output
    assert b"tty: True True (80, 24)\r\n" in output and b"created alice\r\n" in output, output


def test_resizing_the_terminal_resizes_the_commands(deployed):
    code = ("import os, signal; signal.signal(signal.SIGWINCH, lambda *_: print('resized', flush=True)); "
            "input('size> '); print('now', tuple(os.get_terminal_size()))")
    status, output = in_terminal(qabox_argv(deployed["env"], "python", "-c", code), {b"resized": b"\r"},
                                 resize=(b"size> ", 41, 123))  # answered once the host's command saw it
    assert status == 0 and b"now (123, 41)\r\n" in output, output


def test_ctrl_c_without_a_terminal_ends_the_command_on_the_host(deployed):
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    proc = subprocess.Popen(qabox_argv(deployed["env"], "python", "-c", code), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = int(proc.stdout.readline())
    assert in_host("lab1", "kill", "-0", str(pid)).returncode == 0  # it runs there
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 130 and proc.stderr.read() == b"qabox: interrupted\n"
    assert wait_until(lambda: in_host("lab1", "kill", "-0", str(pid)).returncode != 0, 15)


def test_ctrl_c_under_a_terminal_interrupts_the_command_on_the_host(deployed):
    code = "import time; input('ready> '); time.sleep(60)"
    started = time.monotonic()
    status, output = in_terminal(qabox_argv(deployed["env"], "python", "-c", code),
                                 {b"ready> ": b"\r", b"\r\n": b"\x03"})
    assert status == 128 + 2 and b"KeyboardInterrupt" in output, output
    assert time.monotonic() - started < 30


FAILING = ('release = ["python -c \\"import sys; print(\'applying 0002\'); sys.exit(\'no such column: post.author\')\\""]',
           "failed (exit status 1): the new release was removed and release ", "no such column: post.author")
SLOW = ('release_timeout = 3\nrelease = "python -c \'import time; print(\\"waiting for a lock\\", flush=True); '
        'time.sleep(120)\'"', "did not finish within release_timeout (3 s) and was stopped", "waiting for a lock")


@pytest.mark.parametrize("app, message, last_line", [FAILING, SLOW], ids=["failing", "timing-out"])
def test_a_failing_or_timing_out_hook_fails_the_deploy_with_its_output_and_the_current_release_keeps_serving(
        deployed, flaskr, app, message, last_line):
    started = time.monotonic()
    build = flaskr(f'[app]\nentry = "wsgi:app"\n{app}\n', last_line.replace(" ", "-"))
    result = qabox("deploy", build, "--host", "lab1", "--env", deployed["env"])
    assert result.code == 6 and message in result.stderr, result
    assert "keeps serving, on the env's data as the release hooks left it; fix it and deploy again" in result.stderr
    assert f"  | {last_line}\n" in result.stderr
    assert time.monotonic() - started < 60
    assert http_get("lab1", deployed["port"]) == (200, "hello from init-db")
    releases = json_data(qabox("releases", "--host", "lab1", "--env", deployed["env"], "--json").stdout)
    assert len(releases["releases"]) == 1
