"""hosts/NAME.toml: defaults, and errors that name file, line and key."""

from __future__ import annotations

import pytest

from qabox.errors import ConfigError
from qabox.hosts import HostSettings, load_settings


def write(tmp_path, text, name="oldbox"):
    (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_env_ports(tmp_path):
    s = load_settings("oldbox", write(tmp_path, 'port = 9000\n[envs.feature]\nport = 9001\n'))
    assert (s.env_port("main"), s.env_port("feature"), s.env_port("other")) == (9000, 9001, None)
    with pytest.raises(ConfigError, match=r"oldbox.toml:2: unknown key 'colour' in \[envs.x\]"):
        load_settings("oldbox", write(tmp_path, '\n[envs.x]\ncolour = 1\n'))
    with pytest.raises(ConfigError, match=r"oldbox.toml:1: \[envs.x\] port = 0 is not a port"):
        load_settings("oldbox", write(tmp_path, '[envs.x]\nport = 0\n'))


def test_defaults_without_a_file(tmp_path):
    assert load_settings("oldbox", tmp_path) == HostSettings(name="oldbox")


def test_values(tmp_path):
    s = load_settings("oldbox", write(tmp_path, 'dir = "~/srv/qa"\nport = 9000\nkeep = 3\npython = "/usr/bin/python3.11"\n'))
    assert (s.dir, s.port, s.keep, s.python) == ("~/srv/qa", 9000, 3, "/usr/bin/python3.11")


@pytest.mark.parametrize("value", [".qabox", "~/.qabox", "qa/box-1", "~/q_a/.b"])
def test_plain_dirs(tmp_path, value):
    assert load_settings("oldbox", write(tmp_path, f'dir = "{value}"\n')).dir == value


@pytest.mark.parametrize("value", ["/srv/qa", "qa$(touch x)", "a b", "a;b", 'a\\"b', "../up", "a/../b",
                                   "./a", "~", "~/", "a//b", "a/", "-rf", "~user/x", "a`b`", "q\\nx", ""])
def test_dirs_that_a_shell_could_misread_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"oldbox.toml:2: dir = .* is not a plain directory path"):
        load_settings("oldbox", write(tmp_path, f'port = 1\ndir = "{value}"\n'))


@pytest.mark.parametrize("text, message", [
    ('port = 8080\ncolour = "red"\n', r"oldbox.toml:2: unknown key 'colour'"),
    ('\nport = "8080"\n', r"oldbox.toml:2: port = '8080' is not a port from 1 to 65535"),
    ('port = 70000\n', r"oldbox.toml:1: port = 70000 is not a port"),
    ('keep = true\n', r"oldbox.toml:1: keep = True is not a number of releases"),
    ('port = \n', r"oldbox.toml: .*line 1.*fix the TOML syntax"),
])
def test_errors_name_file_line_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("oldbox", write(tmp_path, text))


def test_host_names_that_could_escape_are_refused(tmp_path):
    for name in ("../etc/x", "a b", "a;rm -rf ~", ""):
        with pytest.raises(ConfigError, match="is not valid"):
            load_settings(name, tmp_path)


def test_repo_example_documents_every_key():
    from pathlib import Path

    from qabox.hosts import KEYS

    text = (Path(__file__).parents[1] / "hosts" / "example.toml").read_text()
    for key in KEYS:
        assert f"{key} =" in text or f"[{key}." in text, key


def test_env_environment_tables(tmp_path):
    s = load_settings("oldbox", write(tmp_path, '[envs.qa.environment]\nAPP_MODE = "qa"\nMULTI = """a\nb=c"""\n'))
    assert (s.env_environment("qa"), s.env_environment("main")) == ({"APP_MODE": "qa", "MULTI": "a\nb=c"}, {})
    with pytest.raises(ConfigError, match=r"\[envs.qa.environment\]: PYTHONPATH is set by qabox itself"):
        load_settings("oldbox", write(tmp_path, '[envs.qa.environment]\nPYTHONPATH = "/secret/path"\n'))
    with pytest.raises(ConfigError, match=r"\[envs.qa.environment\]: the value of N is not text$"):
        load_settings("oldbox", write(tmp_path, '[envs.qa.environment]\nN = 3\n'))
