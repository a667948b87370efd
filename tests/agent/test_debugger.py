"""The agent's `debug` command, without SSH: what it refuses before anything starts."""

from __future__ import annotations


def test_debug_refuses_an_env_with_nothing_deployed(host):
    assert host.call("debug", env="fresh")["error"]["code"] == "no_env"
    with host.session("fresh"):
        pass  # the env exists now, with no release
    result = host.call("debug", env="fresh")
    assert result["error"] == {"code": "no_release", "message": "nothing is deployed to env fresh: deploy a build "
                                                                "first, then debug it"}, result
    assert host.processes() == []
