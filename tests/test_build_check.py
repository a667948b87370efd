"""Checking builds locally, before anything is sent."""

from __future__ import annotations

import tarfile

import pytest

from conftest import qabox, raw_tar
from qabox import build_check
from qabox.errors import BuildError


def tar_of(tmp_path, files: dict[str, str], name="b.tar") -> object:
    members = []
    for rel, text in files.items():
        members.append((tarfile.TarInfo(rel), text.encode()))
    return raw_tar(tmp_path / name, members)


def test_entry_from_qabox_toml(tmp_path):
    path = tar_of(tmp_path, {"./notes.py": "", "./qabox.toml": '[app]\nentry = "notes:app"\nhealth = "/health"\n'})
    b = build_check.inspect(path)
    assert (b.entry, b.health, len(b.id)) == ("notes:app", "/health", 64)


def test_default_entries_in_order(tmp_path):
    assert build_check.inspect(tar_of(tmp_path, {"app.py": "", "wsgi.py": ""})).entry == "wsgi:app"
    assert build_check.inspect(tar_of(tmp_path, {"app.py": ""}, "c.tar")).entry == "app:app"
    assert build_check.inspect(tar_of(tmp_path, {"pkg/__init__.py": ""}, "d.tar"), entry="pkg:create").entry == "pkg:create"


def test_missing_entry_says_how_to_name_it(tmp_path):
    with pytest.raises(BuildError, match=r"has no app entry: add `\[app\] entry"):
        build_check.inspect(tar_of(tmp_path, {"main.py": ""}))


def test_entry_module_must_be_in_the_build(tmp_path):
    with pytest.raises(BuildError, match="has no module shop"):
        build_check.inspect(tar_of(tmp_path, {"app.py": ""}), entry="shop:app")
    with pytest.raises(BuildError, match="not of the form module:callable"):
        build_check.inspect(tar_of(tmp_path, {"app.py": ""}, "e.tar"), entry="app;rm -rf ~")


def test_not_a_tar(tmp_path):
    path = tmp_path / "build.tar.gz"
    path.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(BuildError, match="is not a readable tar build"):
        build_check.inspect(path)


def test_truncated_gzip(tmp_path, notes_build):
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(notes_build.read_bytes()[:5000])
    with pytest.raises(BuildError, match="is not a readable tar build"):
        build_check.inspect(path)


def test_missing_file(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        build_check.inspect(tmp_path / "nope.tar")


def test_hostile_members_are_all_named(tmp_path):
    link = tarfile.TarInfo("static/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    dev = tarfile.TarInfo("dev/null")
    dev.type = tarfile.CHRTYPE
    path = raw_tar(tmp_path / "bad.tar", [
        (tarfile.TarInfo("app.py"), b""), (tarfile.TarInfo("../escape.py"), b"x"),
        (tarfile.TarInfo("/etc/cron.d/x"), b"x"), (link, None), (dev, None),
    ])
    with pytest.raises(BuildError) as e:
        build_check.inspect(path)
    for name in ("../escape.py", "/etc/cron.d/x", "static/evil", "dev/null"):
        assert name in e.value.message


@pytest.mark.parametrize("health", ["health", "/health\\r\\n", "/a b", "/\\u00e9"])
def test_bad_health_path(tmp_path, health):
    path = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\nhealth = "%s"\n' % health})
    with pytest.raises(BuildError, match="is not a URL path: use one like"):
        build_check.inspect(path)


def test_a_build_may_not_bring_its_own_release_json(tmp_path):
    for name in ("release.json", "./release.json", "release.json/x"):
        path = tar_of(tmp_path, {"app.py": "", name: "{}"})
        with pytest.raises(BuildError, match="qabox writes each release.s own release.json there"):
            build_check.inspect(path)
    assert build_check.inspect(tar_of(tmp_path, {"app.py": "", "static/release.json": "{}"}))


def test_app_environment_defaults(tmp_path):
    toml = '[app]\nentry = "app:app"\n[app.environment]\nLOG_LEVEL = "info"\n'
    assert build_check.inspect(tar_of(tmp_path, {"app.py": "", "qabox.toml": toml})).environment == {"LOG_LEVEL": "info"}
    assert build_check.inspect(tar_of(tmp_path, {"app.py": ""}, "c.tar")).environment == {}
    bad = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app.environment]\n"A-B" = "x"\n'}, "d.tar")
    with pytest.raises(BuildError, match=r"qabox.toml in d.tar: \[app.environment\]: 'A-B' is not an environment"):
        build_check.inspect(bad)


def test_release_hooks_a_command_line_or_a_list_of_them_with_their_timeout(tmp_path):
    plain = build_check.inspect(tar_of(tmp_path, {"wsgi.py": ""}))
    assert (plain.release_hooks, plain.release_timeout) == ([], 300)
    one = build_check.inspect(tar_of(tmp_path, {"wsgi.py": "", "qabox.toml": (
        '[app]\nrelease = "python manage.py migrate --noinput"\nrelease_timeout = 60\n')}, "one.tar"))
    assert (one.release_hooks, one.release_timeout) == (["python manage.py migrate --noinput"], 60)
    two = build_check.inspect(tar_of(tmp_path, {"wsgi.py": "", "qabox.toml": (
        '[app]\nrelease = ["flask --app flaskr init-db", "python -m app.seed \'a b\'"]\n')}, "two.tar"))
    assert two.release_hooks == ["flask --app flaskr init-db", "python -m app.seed 'a b'"]


@pytest.mark.parametrize("app, message", [
    ('release = 3', r"\[app\] release must be a command line or a list of them"),
    ('release = ["ok", 1]', r"\[app\] release must be a command line or a list of them"),
    ('release = "python -c \'unclosed"', r"\[app\] release hook .* cannot be split into arguments: No closing quotation"),
    ('release = ["  "]', r"\[app\] release has an empty hook"),
    ('release_timeout = 0', r"\[app\] release_timeout = 0 is not a number of seconds above 0"),
    ('release_timeout = "5m"', r"\[app\] release_timeout = '5m' is not a number of seconds above 0"),
])
def test_bad_release_hooks_are_refused_before_anything_is_sent(tmp_path, app, message):
    with pytest.raises(BuildError, match=r"qabox.toml in b.tar: " + message):
        build_check.inspect(tar_of(tmp_path, {"wsgi.py": "", "qabox.toml": "[app]\n" + app + "\n"}))


def test_persist_defaults_to_flasks_instance_folder_and_is_read_from_qabox_toml(tmp_path):
    assert build_check.inspect(tar_of(tmp_path, {"app.py": ""})).persist == ("instance",)
    path = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\npersist = ["media", "db.sqlite3"]\n'
                             "snapshot_max_mb = 20\n"}, "p.tar")
    b = build_check.inspect(path)
    assert (b.persist, b.snapshot_max_mb) == (("media", "db.sqlite3"), 20)


@pytest.mark.parametrize("persist, says", [
    ('"instance"', "is not a list of paths"),
    ('["../x"]', "'../x': a path with '..'"),
    ('["/var/db"]', "'/var/db': an absolute path"),
    ('["wheels"]', "qabox's own (wheels)"),
    ('["release.json"]', "qabox's own (release.json)"),
    ('[""]', "'': not a path"),
    ('["instance", "instance/db"]', "'instance/db': inside 'instance', which is persisted already"),
])
def test_a_bad_persist_path_is_refused_before_sending(tmp_path, persist, says):
    path = tar_of(tmp_path, {"app.py": "", "qabox.toml": "[app]\npersist = %s\n" % persist})
    with pytest.raises(BuildError) as e:
        build_check.inspect(path)
    assert says in e.value.message and "[app] persist" in e.value.message


def test_with_no_entry_qabox_picks_a_django_project_or_a_factory_and_says_why(tmp_path):
    django = build_check.inspect(tar_of(tmp_path, {"manage.py": "", "mysite/__init__.py": "",
                                                   "mysite/wsgi.py": "application = get_wsgi_application()\n"}))
    assert django.entry == "mysite.wsgi:application"
    assert django.entry_reason == "none given, and mysite/wsgi.py (a Django project's) defines application"
    flaskr = build_check.inspect(tar_of(tmp_path, {"flaskr/__init__.py": "import os\n\ndef create_app(test_config=None):\n",
                                                   "flaskr/db.py": ""}, "f.tar"))
    assert (flaskr.entry, flaskr.entry_reason) == (
        "flaskr:create_app()", "none given, and flaskr/__init__.py defines the app factory create_app")
    assert build_check.inspect(tar_of(tmp_path, {"app.py": ""}, "a.tar")).entry_reason == (
        "none given, and the build has app.py (no wsgi.py)")
    named = build_check.inspect(tar_of(tmp_path, {"app.py": ""}, "n.tar"), entry="app:create_app('qa')")
    assert (named.entry, named.entry_reason) == ("app:create_app('qa')", None)


def test_two_candidate_apps_are_not_guessed_between(tmp_path):
    files = {p + "/__init__.py": "def create_app():\n" for p in ("one", "two")}
    with pytest.raises(BuildError, match=r"has several apps \(one:create_app\(\), two:create_app\(\)\): name one"):
        build_check.inspect(tar_of(tmp_path, files))


def test_a_factory_entry_with_code_in_its_arguments_is_refused(tmp_path):
    with pytest.raises(BuildError, match="a factory's arguments must be literals"):
        build_check.inspect(tar_of(tmp_path, {"app.py": ""}), entry="app:create_app(__import__('os'))")


@pytest.mark.parametrize("files", [
    {"requirements.txt": "django\n"},  # the index would bring no Werkzeug
    {"requirements.txt": "flask\n", "wheels/flask-3.0.0-py3-none-any.whl": ""},  # offline: its wheel is not there
])
def test_a_build_whose_requirements_do_not_bring_werkzeug_is_refused_before_anything_is_sent(tmp_path, files):
    path = tar_of(tmp_path, {"mysite/wsgi.py": "application = 1\n", **files})
    with pytest.raises(BuildError, match=r"^b.tar does not bring Werkzeug, qabox's app server: add `werkzeug` "
                                         r"to its requirements.txt \(and its wheel to wheels/\), or make the "
                                         r"build with `qabox build`, which adds it$"):
        build_check.inspect(path)
    result = qabox("deploy", path, "--host", "no-such-host")  # refused before connecting
    assert result.code != 0 and "does not bring Werkzeug" in result.stderr and "no-such-host" not in result.stderr


@pytest.mark.parametrize("files", [
    {"requirements.txt": "Django>=5\nWerkzeug>=3 ; python_version >= '3.8'\n"},
    {"requirements.txt": "flask[async]\n"},
    {"requirements.txt": "django\n", "wheels/Werkzeug-2.0.3-py3-none-any.whl": ""},
    {},  # no requirements: the host's own packages
])
def test_werkzeug_or_flask_in_the_requirements_or_wheels_is_enough(tmp_path, files):
    assert build_check.inspect(tar_of(tmp_path, {"wsgi.py": "", **files})).entry == "wsgi:app"


def test_static_is_read_from_qabox_toml_and_checked(tmp_path):
    good = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\nstatic = {"/static" = "staticfiles"}\n'})
    assert build_check.inspect(good).static == {"/static": "staticfiles"}
    bad = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\nstatic = {"/static" = "/var/www"}\n'}, "s.tar")
    with pytest.raises(BuildError, match=r"qabox.toml in s.tar: \[app\] static: /static = '/var/www' is not"):
        build_check.inspect(bad)


def test_a_checked_build_is_remembered_by_its_file_and_checked_again_once_it_changes(tmp_path):
    path = tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\nhealth = "/up"\n'})
    cache = tmp_path / "cache"
    first = build_check.checked(path, None, 2**30, 1000, cache)
    assert first == build_check.inspect(path)
    (memo,) = (cache / "checked").glob("*.json")
    assert build_check.checked(path, None, 2**30, 1000, cache) == first  # from the memo
    memo.write_text("{garbage")
    assert build_check.checked(path, None, 2**30, 1000, cache) == first  # a damaged memo: the file is read again
    tar_of(tmp_path, {"app.py": "", "qabox.toml": '[app]\nhealth = "/ok"\n'})  # rewritten in place, same size
    assert build_check.checked(path, None, 2**30, 1000, cache).health == "/ok"
    assert build_check.checked(path, "app:app", 2**30, 1000, cache).entry_reason is None  # the entry is part of the key


@pytest.mark.parametrize("platform", ["linux", "other"])  # a forked child's check, or a thread's
def test_a_check_started_early_answers_as_the_check_itself(tmp_path, monkeypatch, platform):
    monkeypatch.setattr(build_check.sys, "platform", platform)
    good = tar_of(tmp_path, {"wsgi.py": "app = None\n", "requirements.txt": "werkzeug\n"})
    limits = (10 * 2**20, 100)
    started = build_check.Checking(good, None, *limits, tmp_path / "cache")
    assert started.result() == build_check.inspect(good, None, *limits)
    bad = tar_of(tmp_path, {"README": "no app here\n"}, name="bad.tar")
    with pytest.raises(BuildError) as expected:
        build_check.inspect(bad, None, *limits)
    with pytest.raises(BuildError) as found:
        build_check.Checking(bad, None, *limits, tmp_path / "cache").result()
    assert str(found.value) == str(expected.value) and type(found.value) is BuildError
