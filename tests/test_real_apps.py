"""Real apps, written the way their frameworks' own docs write them, built with
``qabox build`` and deployed to a lab host: Flask's tutorial app flaskr (a
package with an app factory, an instance folder, a pyproject.toml and no
requirements.txt) and a Django project as ``django-admin startproject`` makes
it (requirements: django alone; static files after collectstatic). Each
deploy's time is printed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import http_get, json_data, qabox

pytestmark = [pytest.mark.usefixtures("lab"), pytest.mark.network]

FLASKR_INIT = '''import os

from flask import Flask


def create_app(test_config=None):
    # create and configure the app
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY='dev',
        DATABASE=os.path.join(app.instance_path, 'flaskr.sqlite'),
    )

    if test_config is None:
        # load the instance config, if it exists, when not testing
        app.config.from_pyfile('config.py', silent=True)
    else:
        # load the test config if passed in
        app.config.from_mapping(test_config)

    # ensure the instance folder exists
    os.makedirs(app.instance_path, exist_ok=True)

    # a simple page that says hello
    @app.route('/hello')
    def hello():
        return 'Hello, World! VERSION'

    from . import db
    db.init_app(app)

    return app
'''

FLASKR_DB = '''import sqlite3

import click
from flask import current_app, g


def get_db():
    if 'db' not in g:
        g.db = sqlite3.connect(current_app.config['DATABASE'], detect_types=sqlite3.PARSE_DECLTYPES)
        g.db.row_factory = sqlite3.Row
    return g.db


def close_db(e=None):
    db = g.pop('db', None)
    if db is not None:
        db.close()


def init_db():
    db = get_db()
    with current_app.open_resource('schema.sql') as f:
        db.executescript(f.read().decode('utf8'))


@click.command('init-db')
def init_db_command():
    """Clear the existing data and create new tables."""
    init_db()
    click.echo('Initialized the database.')


def init_app(app):
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
'''

FLASKR_PYPROJECT = '''[project]
name = "flaskr"
version = "1.0.0"
description = "The basic blog app built in the Flask tutorial."
dependencies = [
    "flask",
]

[build-system]
requires = ["flit_core<4"]
build-backend = "flit_core.buildapi"
'''


def timed(what: str, *args: str):
    started = time.monotonic()
    result = qabox(*args)
    seconds = time.monotonic() - started
    sys.__stdout__.write(f"\n  timing: {what}: {seconds:.1f} s (exit {result.code})\n")
    sys.__stdout__.flush()
    return result, seconds


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def deploy_json(build: Path, env: str, port: int) -> dict:
    result, _ = timed(f"deploy {build.name}", "deploy", build, "--host", "lab1", "--env", env, "--port", port,
                      "--json")
    assert result.code == 0, result
    return json_data(result.stdout)


def test_flaskr_as_the_tutorial_writes_it(tmp_path, env_name, port):
    src = write(tmp_path / "flask-tutorial", {"flaskr/__init__.py": FLASKR_INIT.replace("VERSION", "v1"),
                                              "flaskr/db.py": FLASKR_DB,
                                              "flaskr/schema.sql": "CREATE TABLE post (id INTEGER);\n",
                                              "pyproject.toml": FLASKR_PYPROJECT,
                                              "qabox.toml": '[app]\nhealth = "/hello"\n'})
    result, _ = timed("build flaskr", "build", src, "-o", tmp_path / "f1.tar.gz", "--app", "flaskr:create_app()")
    assert result.code == 0, result
    assert "requirements: pyproject.toml's [project] dependencies" in result.stdout, result
    first = deploy_json(tmp_path / "f1.tar.gz", env_name, port)
    assert first["venv_created"] and first["entry"] == "flaskr:create_app()", first
    assert http_get("lab1", port, "/hello") == (200, "Hello, World! v1")

    (src / "flaskr" / "__init__.py").write_text(FLASKR_INIT.replace("VERSION", "v2"))
    assert qabox("build", src, "-o", tmp_path / "f2.tar.gz", "--app", "flaskr:create_app()").code == 0
    second = deploy_json(tmp_path / "f2.tar.gz", env_name, port)
    assert not second["venv_created"], second  # its code changed, its dependencies did not
    assert http_get("lab1", port, "/hello") == (200, "Hello, World! v2")

    # no entry named: qabox finds the factory, and says so
    assert qabox("build", src, "-o", tmp_path / "f3.tar.gz").code == 0
    result, _ = timed("deploy flaskr, entry picked by qabox", "deploy", tmp_path / "f3.tar.gz", "--host", "lab1",
                      "--env", env_name, "--port", port)
    assert result.code == 0, result
    assert ("entry flaskr:create_app(): none given, and flaskr/__init__.py defines the app factory "
            "create_app") in result.stdout, result


@pytest.fixture(scope="module")
def django(tmp_path_factory) -> Path:
    """Django, installed from its wheel off the package index into a directory of its own."""
    top = tmp_path_factory.mktemp("django")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "--target", str(top / "lib"), "django>=5.2,<5.3"], check=True)
    return top / "lib"


def startproject(django: Path, where: Path, settings: str = "") -> Path:
    """``django-admin startproject mysite``, its settings extended with ``settings``, after collectstatic."""
    where.mkdir()
    run = dict(env=dict(os.environ, PYTHONPATH=str(django)), check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(where)], **run)
    with open(where / "mysite" / "settings.py", "a") as f:
        f.write('\nSTATIC_ROOT = BASE_DIR / "staticfiles"\n' + settings)
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput"], cwd=where, **run)
    (where / "requirements.txt").write_text("django>=5.2,<5.3\n")
    (where / "qabox.toml").write_text('[app]\nhealth = "/admin/login/"\nstatic = {"/static" = "staticfiles"}\n')
    return where


def test_a_django_project_as_startproject_makes_it(tmp_path, django, env_name, port):
    src = startproject(django, tmp_path / "site")
    result, _ = timed("build django", "build", src, "-o", tmp_path / "d1.tar.gz")
    assert result.code == 0, result
    assert "requirements: requirements.txt, and werkzeug (qabox's app server)" in result.stdout, result
    assert ("entry mysite.wsgi:application: none given, and mysite/wsgi.py (a Django project's) defines "
            "application") in result.stdout, result
    result, _ = timed("deploy django", "deploy", tmp_path / "d1.tar.gz", "--host", "lab1", "--env", env_name,
                      "--port", port)
    assert result.code == 0, result
    assert "entry mysite.wsgi:application: none given" in result.stdout, result
    code, body = http_get("lab1", port, "/admin/login/")
    assert code == 200 and "Django" in body
    code, css = http_get("lab1", port, "/static/admin/css/base.css")
    assert code == 200 and "DJANGO Admin styles" in css, css[:200]

    # DEBUG=False and a host qabox's probe is not: Django answers 400 to every request
    wrong = startproject(django, tmp_path / "site-400", 'DEBUG = False\nALLOWED_HOSTS = ["qa.example.com"]\n')
    assert qabox("build", wrong, "-o", tmp_path / "d2.tar.gz").code == 0
    result, seconds = timed("deploy django answering 400", "deploy", tmp_path / "d2.tar.gz", "--host", "lab1",
                            "--env", env_name, "--port", port)
    assert result.code != 0, result
    assert "answered HTTP 400 on every probe for 3 s (up is 200-399)" in result.stderr, result
    assert "the previous release keeps serving" in result.stderr, result
    assert seconds < 20, seconds  # not the start timeout: 30 s
    assert http_get("lab1", port, "/admin/login/")[0] == 200  # the first release, still


# ---------------------------------------------------------------- the README's "Deploying a real app", as written

FLASKR_TOML = '[app]\nentry = "flaskr:create_app()"\nhealth = "/hello"\n'
FLASKR_SECRET = ("import secrets; open('instance/config.py', 'w')"
                 ".write('SECRET_KEY = %r\\n' % secrets.token_hex())")
DJANGO_SETTINGS = '''
import os
SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")
STATIC_ROOT = BASE_DIR / "staticfiles"
'''
DJANGO_TOML = '''[app]
health = "/admin/login/"
static = {"/static" = "staticfiles"}
persist = ["db.sqlite3"]
release = ["python manage.py migrate --noinput", "python manage.py collectstatic --noinput"]
'''


def run_on(env: str, *argv: str) -> tuple[int, str]:
    """``qabox run`` in the env, as the README's recipes use it: (exit code, output)."""
    result = qabox("run", "--host", "lab1", "--env", env, "--", *argv)
    return result.code, result.stdout + result.stderr


def test_flaskr_as_the_readme_deploys_it(tmp_path, env_name, port):
    files = {"flaskr/__init__.py": FLASKR_INIT.replace("VERSION", "v1"), "flaskr/db.py": FLASKR_DB,
             "flaskr/schema.sql": "DROP TABLE IF EXISTS post;\nCREATE TABLE post (id INTEGER);\n",
             "pyproject.toml": FLASKR_PYPROJECT, "qabox.toml": FLASKR_TOML}
    src = write(tmp_path / "flask-tutorial", files)
    assert qabox("build", src, "-o", tmp_path / "flaskr.tar.gz").code == 0
    result, _ = timed("deploy flaskr as the README does", "deploy", tmp_path / "flaskr.tar.gz", "--host", "lab1",
                      "--env", env_name, "--port", port)
    assert result.code == 0, result
    assert run_on(env_name, "flask", "--app", "flaskr", "init-db") == (0, "Initialized the database.\n")
    assert run_on(env_name, "python", "-c", FLASKR_SECRET)[0] == 0
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    check = "from flaskr import create_app; print(create_app().config['SECRET_KEY'] != 'dev')"
    assert run_on(env_name, "python", "-c", check) == (0, "True\n")
    insert = "import sqlite3; c = sqlite3.connect('instance/flaskr.sqlite'); c.execute('insert into post values (1)'); c.commit()"
    assert run_on(env_name, "python", "-c", insert)[0] == 0
    write(src, {"flaskr/__init__.py": FLASKR_INIT.replace("VERSION", "v2")})
    assert qabox("build", src, "-o", tmp_path / "flaskr2.tar.gz").code == 0
    result, _ = timed("redeploy flaskr", "deploy", tmp_path / "flaskr2.tar.gz", "--host", "lab1", "--env", env_name)
    assert result.code == 0, result
    assert http_get("lab1", port, "/hello") == (200, "Hello, World! v2")
    count = "import sqlite3; print(sqlite3.connect('instance/flaskr.sqlite').execute('select count(*) from post').fetchone()[0])"
    assert run_on(env_name, "python", "-c", count) == (0, "1\n")  # the data followed the env
    assert run_on(env_name, "python", "-c", check) == (0, "True\n")  # and so did the secret
    result, _ = timed("roll flaskr back", "rollback", "--host", "lab1", "--env", env_name)
    assert result.code == 0 and http_get("lab1", port, "/hello") == (200, "Hello, World! v1"), result
    assert run_on(env_name, "python", "-c", count) == (0, "1\n")  # a rollback keeps the env's data


def test_django_as_the_readme_deploys_it(tmp_path, django, env_name, port):
    src = tmp_path / "mysite"
    src.mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(src)],
                   env=dict(os.environ, PYTHONPATH=str(django)), check=True)
    with open(src / "mysite" / "settings.py", "a") as f:
        f.write(DJANGO_SETTINGS)
    write(src, {"requirements.txt": "django>=5.2,<5.3\n", "qabox.toml": DJANGO_TOML})
    secret = "s3cret-" + os.urandom(8).hex()
    for name, value in (("DJANGO_SECRET_KEY", secret), ("DJANGO_SUPERUSER_PASSWORD", "admin-" + secret)):
        assert qabox("config", "set", name, "--host", "lab1", "--env", env_name, input=value + "\n").code == 0
    assert qabox("build", src, "-o", tmp_path / "mysite.tar.gz").code == 0
    result, _ = timed("deploy django as the README does", "deploy", tmp_path / "mysite.tar.gz", "--host", "lab1",
                      "--env", env_name, "--port", port)
    assert result.code == 0, result
    code, css = http_get("lab1", port, "/static/admin/css/base.css")
    assert code == 200 and "DJANGO Admin styles" in css  # collectstatic ran, qabox serves it (DEBUG off)
    assert http_get("lab1", port, "/admin/login/")[0] == 200
    code, out = run_on(env_name, "python", "manage.py", "createsuperuser", "--noinput", "--username", "admin",
                       "--email", "admin@example.com")
    assert code == 0 and "Superuser created successfully." in out, out
    with open(src / "mysite" / "settings.py", "a") as f:
        f.write("# a second release\n")
    assert qabox("build", src, "-o", tmp_path / "mysite2.tar.gz").code == 0
    result, _ = timed("redeploy django", "deploy", tmp_path / "mysite2.tar.gz", "--host", "lab1", "--env", env_name)
    assert result.code == 0, result
    count = "from django.contrib.auth.models import User; print(User.objects.count())"
    code, out = run_on(env_name, "python", "manage.py", "shell", "-c", count)
    assert code == 0 and out.splitlines()[-1] == "1", out  # db.sqlite3 is the env's, not the release's
    result, _ = timed("roll django back", "rollback", "--host", "lab1", "--env", env_name)
    assert result.code == 0 and http_get("lab1", port, "/admin/login/")[0] == 200, result
    status = qabox("status", "--host", "lab1", "--env", env_name, "--json").stdout
    assert secret not in status and secret not in qabox("logs", "--host", "lab1", "--env", env_name).stdout
