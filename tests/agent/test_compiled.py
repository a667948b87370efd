"""The agent's compiled copy (agent.compiled): written by install, used only when its
bytes are what its name says, and removed with its version."""

from __future__ import annotations

import shutil
import sys

import pytest

from conftest import Host


@pytest.fixture
def installed(agent_cmd, tmp_path):
    """A host whose agent (a private copy of the archive) was installed: (host, agent dir)."""
    argv = agent_cmd()
    folder = tmp_path / ".qabox" / "agent"
    folder.mkdir(parents=True)
    archive = folder / argv[-1].rsplit("/", 1)[-1]
    shutil.copy(argv[-1], archive)
    host = Host(argv[:-1] + [str(archive)], tmp_path)
    assert not host.data("hello")["compiled"]
    host.data("install")
    return host, folder


def copies(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.zip"))


def test_install_compiles_the_agent_once_for_its_python_and_calls_then_use_it(installed):
    host, folder = installed
    (copy,) = copies(folder)
    assert copy.startswith(f"{host.argv[-1].rsplit('/', 1)[-1][:-4]}.{sys.implementation.cache_tag}-")
    assert host.data("hello")["compiled"]
    host.data("install")  # again: it has one already
    assert copies(folder) == [copy]


@pytest.mark.parametrize("damage", [b"garbage", b"PK\x05\x06" + b"\0" * 18])
def test_a_damaged_compiled_copy_is_never_loaded(installed, damage):
    host, folder = installed
    (copy,) = folder.glob("*.zip")
    copy.write_bytes(damage)  # its name no longer says its bytes: the sources are used
    hello = host.call("hello")
    assert hello["ok"] and not hello["data"]["compiled"], (hello, host.stderr)
    assert host.call("status")["ok"]


def test_a_version_nothing_runs_goes_with_its_compiled_copies(installed):
    host, folder = installed
    old = "agent-0123456789abcdef"
    for name in (f"{old}.pyz", f"{old}.cpython-36-00000000000000aa.zip", f"{old}.cpython-313-0000000000000bbb.zip"):
        (folder / name).write_bytes(b"an older version")
    (folder / "notes.zip").write_bytes(b"not the agent's")
    removed = host.data("install")["removed"]
    assert sorted(removed) == sorted([f"{old}.pyz", f"{old}.cpython-36-00000000000000aa.zip",
                                      f"{old}.cpython-313-0000000000000bbb.zip"])
    assert len(copies(folder)) == 2 and (folder / "notes.zip").exists()  # its own copy, and what is not ours
