"""The app's configuration per env, through the agent as qabox calls it (no SSH):
stored 0600 on the host, layered over the build's and the hosts file's defaults,
given to the app as its environment by a restart."""

from __future__ import annotations

import ast
import os
import stat

import pytest

from conftest import Host, free_port, local_get, wsgi_build

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels
ENV = "main"
SECRET = "s3cr=t\nline two = with 'quotes' and $HOME"


@pytest.fixture(scope="module")
def box(module_host, tmp_path_factory):
    """A host with a release whose qabox.toml had CFG_A and CFG_B as defaults."""
    port = free_port()
    first = module_host.deploy(wsgi_build(tmp_path_factory.mktemp("cfgbox") / "v1.tar.gz"), ENV, port,
                               environment={"CFG_A": "from toml", "CFG_B": "from toml"},
                               hosts_environment={"CFG_B": "from hosts", "CFG_C": "from hosts"})
    assert first["ok"], first
    return {"host": module_host, "port": port}


def served(port: int) -> dict:
    code, body = local_get(port, "/env")
    assert code == 200, body
    return dict(ast.literal_eval(body))


def change(local: Host, **args) -> tuple[dict, dict]:
    """config-change then, as qabox does unless --no-restart, restart: both results."""
    with local.session(ENV) as call:
        changed = call("config-change", env=ENV, **args)
        assert changed["ok"], changed
        restarted = call("restart", env=ENV) if changed["changed"] and changed["data"]["restart"] else None
    return changed, restarted


def test_the_app_sees_the_builds_then_the_hosts_files_defaults(box):
    assert served(box["port"]) == {"CFG_A": "from toml", "CFG_B": "from hosts", "CFG_C": "from hosts"}


def test_set_stores_0600_and_a_restart_gives_the_app_any_text(box):
    local, port = box["host"], box["port"]
    changed, restarted = change(local, set={"CFG_C": SECRET, "CFG_D": "x"}, hosts_environment={
        "CFG_B": "from hosts", "CFG_C": "from hosts"})
    assert changed["changed"] and changed["data"]["names"] == ["CFG_C", "CFG_D"], changed
    assert SECRET not in str(changed) and restarted["ok"], restarted
    assert served(port) == {"CFG_A": "from toml", "CFG_B": "from hosts", "CFG_C": SECRET, "CFG_D": "x"}
    path = os.path.join(local.base, "envs", ENV, "config.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, _ = change(local, set={"CFG_D": "x"})
    assert not again["changed"] and again["data"]["names"] == []


def test_list_masks_values_unless_shown_and_names_each_source(box):
    local = box["host"]
    masked = local.data("config-list", env=ENV)
    assert not masked["shown"] and SECRET not in str(masked)
    assert [(v["name"], v["source"], v["value"]) for v in masked["variables"]] == [
        ("CFG_A", "qabox.toml", None), ("CFG_B", "hosts file", None), ("CFG_C", "config", None),
        ("CFG_D", "config", None)]
    shown = local.data("config-list", env=ENV, show=True)
    assert {v["name"]: v["value"] for v in shown["variables"]}["CFG_C"] == SECRET


def test_unset_falls_back_to_the_defaults(box):
    local, port = box["host"], box["port"]
    changed, restarted = change(local, unset=["CFG_C", "CFG_D", "CFG_NONE"])
    assert changed["data"]["names"] == ["CFG_C", "CFG_D"] and changed["data"]["not_set"] == ["CFG_NONE"]
    assert restarted["ok"]
    assert served(port) == {"CFG_A": "from toml", "CFG_B": "from hosts", "CFG_C": "from hosts"}


@pytest.mark.parametrize("name", ["QABOX_DATA_DIR", "PATH", "PYTHONPATH", "FLASK_DEBUG", "1BAD", "A-B", "A B"])
def test_bad_or_reserved_names_are_refused_and_nothing_changes(box, name):
    local = box["host"]
    before = local.data("config-list", env=ENV, show=True)
    with local.session(ENV) as call:
        refused = call("config-change", env=ENV, set={"CFG_OK": "v", name: SECRET})
    assert not refused["ok"] and refused["error"]["code"] == "bad_config", refused
    assert SECRET not in str(refused) and "nothing was changed" in refused["error"]["message"]
    assert local.data("config-list", env=ENV, show=True) == before


def test_a_value_no_environment_can_hold_is_refused_and_nothing_changes(box):
    """A NUL would be stored, then fail every start and one-off command of the env."""
    local = box["host"]
    before = local.data("config-list", env=ENV, show=True)
    with local.session(ENV) as call:
        refused = call("config-change", env=ENV, set={"CFG_OK": "v", "CFG_NUL": SECRET + "\0"})
    assert not refused["ok"] and refused["error"]["code"] == "bad_config", refused
    assert "the value of CFG_NUL holds a NUL character" in refused["error"]["message"]
    assert SECRET not in str(refused) and local.data("config-list", env=ENV, show=True) == before


def test_a_change_needs_the_deploy_lock(box):
    refused = box["host"].call("config-change", env=ENV, set={"CFG_X": "v"})
    assert not refused["ok"] and "runs only in a session holding env main's lock" in refused["error"]["message"]


def test_config_of_an_env_with_nothing_deployed_is_kept_for_its_first_deploy(host, tmp_path):
    with host.session("fresh") as call:
        changed = call("config-change", env="fresh", set={"CFG_FIRST": "early"})
    assert changed["ok"] and changed["data"]["release"] is None and not changed["data"]["restart"], changed
    port = free_port()
    assert host.deploy(wsgi_build(tmp_path / "v1.tar.gz"), "fresh", port)["ok"]
    assert served(port) == {"CFG_FIRST": "early"}
