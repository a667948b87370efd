"""The agent's archive: the same source gives the same bytes, and it holds the whole package."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from qabox import agent_zip

SOURCES = Path(agent_zip.__file__).parent / "agent"


def test_the_same_source_gives_the_same_archive_in_another_process():
    code = "from qabox import agent_zip; print(agent_zip.AGENT_HASH)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}, cwd="/")
    assert other.stdout.strip() == agent_zip.AGENT_HASH
    assert agent_zip.build() == agent_zip.AGENT_PYZ


def test_the_archive_holds_every_module_sorted_with_fixed_times():
    archive = zipfile.ZipFile(io.BytesIO(agent_zip.AGENT_PYZ))
    names = archive.namelist()
    assert names == sorted(names)
    assert set(names) == {"__main__.py"} | {f"qabox_agent/{p.name}" for p in SOURCES.glob("*.py")}
    assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
