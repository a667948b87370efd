"""[app] server and [server] in a build, their overrides in the hosts file, what
`qabox build` adds for them and what `hosts check` says of the workers: no lab."""

from __future__ import annotations

import pytest

from qabox import build_check
from qabox.agent import rules
from qabox.commands.build import server_packages
from qabox.commands.hosts import server_check
from qabox.errors import BuildError, ConfigError
from qabox.hosts import load_settings
from test_build_check import tar_of

WSGI = {"wsgi.py": "app = 1\n"}


def test_a_build_names_its_server_and_knobs(tmp_path):
    path = tar_of(tmp_path, {**WSGI, "requirements.txt": "waitress\n",
                             "qabox.toml": '[app]\nserver = "waitress"\n[server]\nthreads = 16\n'})
    build = build_check.inspect(path)
    assert (build.server, build.server_options) == ("waitress", {"threads": 16})
    assert build_check.inspect(tar_of(tmp_path, WSGI, "plain.tar")).server == "werkzeug"


@pytest.mark.parametrize("toml, message", [
    ('[app]\nserver = "uwsgi"\n', '[app] server = \'uwsgi\' is not an app server qabox runs: use "werkzeug", '
                                   '"waitress", "gunicorn"'),
    ('[app]\nserver = "waitress"\n[server]\nworkers = 2\n', "[server] workers applies to gunicorn only, and the "
                                                           "server is waitress: remove it"),
    ('[app]\nserver = "gunicorn"\n[server]\nthreads = 0\n', "[server] threads = 0 is not a number of threads "
                                                           "from 1 to 256"),
    ('[app]\nserver = "gunicorn"\n[server]\nthread = 4\n', "[server] thread is not a knob qabox knows"),
    ('[server]\nthreads = 4\n', "[server] threads applies to waitress and gunicorn only, and the server is "
                                "werkzeug"),
])
def test_a_bad_server_or_knob_is_one_line_naming_the_key(tmp_path, toml, message):
    path = tar_of(tmp_path, {**WSGI, "requirements.txt": "gunicorn\nwaitress\nwerkzeug\n", "qabox.toml": toml})
    with pytest.raises(BuildError) as raised:
        build_check.inspect(path)
    assert str(raised.value).startswith("qabox.toml in b.tar: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_build_must_bring_its_server_and_werkzeug_for_static(tmp_path):
    toml = '[app]\nserver = "gunicorn"\n'
    with pytest.raises(BuildError, match=r"^b.tar does not bring gunicorn, the app server its qabox.toml names"):
        build_check.inspect(tar_of(tmp_path, {**WSGI, "requirements.txt": "flask\n", "qabox.toml": toml}))
    static = toml + '[app.static]\n"/static" = "static"\n'
    with pytest.raises(BuildError, match=r"^s.tar does not bring Werkzeug, which serves its \[app\] static"):
        build_check.inspect(tar_of(tmp_path, {**WSGI, "requirements.txt": "gunicorn\n", "qabox.toml": static},
                                   "s.tar"))


def test_the_hosts_file_overrides_the_server_per_host_then_per_env(tmp_path):
    (tmp_path / "oldbox.toml").write_text('server = "waitress"\nserver_options = {threads = 12}\n'
                                          '[envs.qa]\nserver = "gunicorn"\nserver_options = {workers = 2}\n')
    settings = load_settings("oldbox", tmp_path)
    assert settings.env_server("main", "werkzeug", {"idle_timeout": 5}) == \
        ("waitress", {"idle_timeout": 5, "threads": 12})
    assert settings.env_server("qa", "werkzeug", {}) == ("gunicorn", {"threads": 12, "workers": 2})
    (tmp_path / "bad.toml").write_text('[envs.qa]\nserver = "uwsgi"\n')
    with pytest.raises(ConfigError, match=r"bad.toml:1: \[envs.qa\] server = 'uwsgi' is not an app server"):
        load_settings("bad", tmp_path)


def test_qabox_build_adds_the_server_it_names(tmp_path):
    assert server_packages(tmp_path) == ["werkzeug"]
    (tmp_path / "qabox.toml").write_text('[app]\nserver = "gunicorn"\n')
    assert server_packages(tmp_path) == ["werkzeug", rules.SERVER_PACKAGES["gunicorn"]]


def test_gunicorn_workers_come_from_the_cores_and_hosts_check_warns_when_they_do_not_fit(tmp_path):
    assert [rules.server_processes("gunicorn", {}, cores) for cores in (1, 2, 8)] == [3, 4, 4]
    assert rules.server_processes("waitress", {"threads": 64}, 8) == 1
    (tmp_path / "oldbox.toml").write_text('[envs.qa]\nserver = "gunicorn"\nserver_options = {workers = 9}\n')
    facts = {"cores": 2, "memory_bytes": 4 * 10**9, "envs": {"main": {"server": "waitress", "server_options": {}}}}
    check = server_check(load_settings("oldbox", tmp_path), facts)
    assert check.ok and check.warning and "main on waitress, qa on gunicorn (9 workers)" in check.detail
    assert "qa's 9 workers are more than 2 per core and one (5)" in check.detail and "workers" in check.fix
    fine = server_check(load_settings("other", tmp_path), dict(facts, memory_bytes=16 * 10**9))
    assert fine.ok and not fine.warning and fine.detail == "2 cores, 16.0 GB of memory; main on waitress"


def test_a_hosts_file_override_needs_a_build_that_brings_that_server(tmp_path):
    offline = build_check.inspect(tar_of(tmp_path, {**WSGI, "requirements.txt": "flask\nwaitress\n",
                                                    "wheels/flask-3.0.0-py3-none-any.whl": "",
                                                    "wheels/werkzeug-3.0.0-py3-none-any.whl": "",
                                                    "wheels/waitress-3.0.2-py3-none-any.whl": ""}))
    assert build_check.build_brings(offline, "waitress") and not build_check.build_brings(offline, "gunicorn")
