"""Builds for the python that will run them: the tags a host's pip takes, markers judged for the
host's python (uv), requirements that come only as sdists, the project's own wheels/, and a deploy
that refuses wheels the host cannot install before sending anything."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import LAB_HOME, http_get, in_host, qabox
from qabox import build_check, host_python, wheelhouse
from qabox.errors import BuildError
from qabox.host_python import Target
from qabox.pack import pack

MARKUPSAFE_2014 = "markupsafe-3.0.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
APP = """
import importlib
NAMES = {names!r}

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    found = [n for n in NAMES if importlib.util.find_spec(n)]
    return [" ".join(importlib.import_module(n).VALUE for n in found).encode()]
"""


def tiny_wheel(dest: Path, name: str, version: str = "1.0") -> Path:
    """A pure-python wheel of one module ``name`` (dashes as underscores) whose VALUE is its name."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {f"{module}.py": f"VALUE = {name!r}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(text.encode())}\n" for path, text in files.items()) + f"{dist}/RECORD,,\n"
    path = dest / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_in, text in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(name_in, text)
    return path


EXTENSION = """
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "NAME", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModule_Create(&module); }
"""


def tiny_sdist(dest: Path, name: str, version: str = "1.0", compiled: bool = False) -> Path:
    """An sdist (setuptools) of one module ``name``: pure python, or a C extension."""
    module = name.replace("-", "_")
    top = f"{module}-{version}"
    ext = f", ext_modules=[Extension({module!r}, [{module + '.c'!r}])]" if compiled else f", py_modules=[{module!r}]"
    files = {"pyproject.toml": '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n',
             "setup.py": f"from setuptools import Extension, setup\nsetup(name={name!r}, version={version!r}{ext})\n",
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{module}.c" if compiled else f"{module}.py":
                 EXTENSION.replace("NAME", module) if compiled else f"VALUE = {name!r}\n"}
    path = dest / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def project(tmp_path: Path, requirements: str, names: list[str]) -> Path:
    """A bare WSGI app that answers the VALUE of each of ``names`` it can import, with a wheels/ directory."""
    src = tmp_path / "project"
    (src / "wheels").mkdir(parents=True)
    (src / "wsgi.py").write_text(APP.format(names=names))
    (src / "requirements.txt").write_text(requirements)
    return src


def host_python_version() -> str:
    return in_host("lab1", "/usr/bin/python3", "-c", "import platform; print(platform.python_version())").stdout.strip()


# ---------------------------------------------------------------- the tags a host's pip takes


def test_each_pip_takes_the_manylinux_tags_it_knows_and_the_glibc_allows():
    def linux(pip: str, glibc: str | None = "2.36") -> list[str]:
        return Target(python="3.11.2", glibc=glibc, pip=pip).platforms()

    assert linux("18.1") == ["manylinux1_x86_64", "linux_x86_64"]  # python 3.6's bundled pip
    assert linux("19.0") == ["manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    assert linux("19.3") == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    modern = linux("20.3")
    assert modern[0] == "manylinux_2_36_x86_64" and modern[-2:] == ["manylinux1_x86_64", "linux_x86_64"]
    assert "manylinux_2_28_x86_64" in modern and "manylinux_2_37_x86_64" not in modern
    assert "manylinux_2_28_x86_64" not in linux("23.0", "2.17")  # CentOS 7: its glibc is older
    assert linux("23.0", None) == ["linux_x86_64"]  # musl: no manylinux wheel runs
    assert Target(python="3.11", platform="manylinux2014_aarch64").platforms() == ["manylinux2014_aarch64"]


def test_a_host_takes_a_wheel_only_for_its_python_abi_and_platform():
    py36 = Target(python="3.6.15", abiflags="m", glibc="2.36", pip="18.1")
    assert py36.abi == "cp36m" and py36.accepts("markupsafe-2.0.1-cp36-cp36m-manylinux1_x86_64.whl")
    assert not py36.accepts("markupsafe-2.0.1-cp36-cp36m-manylinux2010_x86_64.whl")  # pip 18.1 predates it
    assert py36.accepts("werkzeug-2.0.3-py3-none-any.whl")
    debian = Target(python="3.11.2", glibc="2.36", pip="23.0.1")
    assert debian.accepts(MARKUPSAFE_2014) and not debian.accepts(MARKUPSAFE_2014.replace("cp311", "cp312"))
    assert not debian.accepts("markupsafe-3.0.4-cp311-cp311-macosx_11_0_arm64.whl")
    assert Target(python="3.9.18", implementation="pypy", soabi="pypy39-pp73-x86_64-linux-gnu").abi == "pypy39_pp73"
    assert debian.uv_platform() == "x86_64-manylinux_2_36"
    assert Target(python="3.11.2", glibc="2.41").uv_platform() == "x86_64-manylinux_2_40"
    assert Target(python="3.11.2").uv_platform() == "x86_64-unknown-linux-musl"
    assert Target(python="3.11.2", glibc="2.36", pip="23.0.1", name="lab1's python").describe() == \
        "lab1's python 3.11.2 (linux-x86_64, glibc 2.36, pip 23.0.1)"


@pytest.mark.network  # uv asks the package index for these names (it has none of them)
def test_markers_are_judged_for_the_targets_python_not_this_one(tmp_path):
    for name in ("qabox-test-old-python", "qabox-test-new-python"):
        tiny_wheel(tmp_path, name)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text('qabox-test-old-python; python_full_version <= "3.11.2"\n'
                            'qabox-test-new-python; python_full_version > "3.11.2"\n')
    for python, pin in (("3.11.2", "qabox-test-old-python==1.0"), ("3.11.7", "qabox-test-new-python==1.0")):
        assert wheelhouse.pins(requirements, Target(python=python, glibc="2.36"), [tmp_path]) == [pin]


@pytest.mark.network  # the wheels, from the package index
def test_python_36s_pip_gets_manylinux1_wheels_and_the_versions_its_python_runs(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("werkzeug\nmarkupsafe\n")
    py36 = Target(python="3.6.15", abiflags="m", glibc="2.36", pip="18.1", name="centos7's python")
    pinned = wheelhouse.pins(requirements, py36, [])
    assert pinned == ["dataclasses==0.8", "markupsafe==2.0.1", "werkzeug==2.0.3"]  # the last for python 3.6
    wheels, built = wheelhouse.fetch(pinned, tmp_path / "wheels", py36, [])
    names = sorted((w.name for w in wheels), key=str.lower)
    assert built == [] and [n.split("-")[0].lower() for n in names] == ["dataclasses", "markupsafe", "werkzeug"]
    assert "-cp36-cp36m-" in names[1] and "manylinux1_x86_64" in names[1].split("-")[-1], names
    assert all(py36.accepts(n) for n in names)


# ---------------------------------------------------------------- on the lab host


@pytest.mark.usefixtures("lab")
@pytest.mark.network  # werkzeug and setuptools from the package index
def test_build_for_the_host_resolves_its_markers_builds_an_sdist_and_ships_the_projects_wheels(
        tmp_path, env_name, port):
    host, here = host_python_version(), ".".join(map(str, sys.version_info[:3]))
    if host == here:
        pytest.skip(f"the lab host's python is this one ({here}): no markers to tell apart")
    src = project(tmp_path, f'qabox-test-host; python_full_version == "{host}"\n'
                            f'qabox-test-here; python_full_version == "{here}"\n'
                            "qabox-test-sdist==1.0\n",
                  ["qabox_test_host", "qabox_test_here", "qabox_test_sdist"])
    tiny_wheel(src / "wheels", "qabox-test-host")
    tiny_wheel(src / "wheels", "qabox-test-here")
    tiny_sdist(src / "wheels", "qabox-test-sdist")

    result = qabox("build", src, "-o", tmp_path / "for-host.tar.gz", "--for", "lab1")
    assert result.code == 0, result
    assert f"wheels for lab1's python {host} (linux-x86_64" in result.stdout, result
    assert "built here from their sdists: qabox-test-sdist==1.0" in result.stdout, result
    built = build_check.inspect(tmp_path / "for-host.tar.gz")
    assert [w.split("-")[0] for w in built.wheels] == ["markupsafe", "qabox_test_host", "qabox_test_sdist", "werkzeug"]
    assert built.resolved_for["python"] == host and built.resolved_for["name"] == "lab1's python"
    deployed = qabox("deploy", tmp_path / "for-host.tar.gz", "--host", "lab1", "--env", env_name, "--port", port)
    assert deployed.code == 0, deployed
    assert http_get("lab1", port) == (200, "qabox-test-host qabox-test-sdist")

    # without --for: this machine's python, its own markers, and the record says so
    assert qabox("build", src, "-o", tmp_path / "here.tar.gz").code == 0
    built = build_check.inspect(tmp_path / "here.tar.gz")
    assert [w.split("-")[0] for w in built.wheels] == ["markupsafe", "qabox_test_here", "qabox_test_sdist", "werkzeug"]
    assert built.resolved_for["python"] == here and built.resolved_for["name"] == "this machine's python"


@pytest.mark.usefixtures("lab")
@pytest.mark.network  # setuptools from the package index
def test_an_sdist_that_compiles_code_is_refused_for_another_python(tmp_path):
    src = project(tmp_path, "qabox-test-ext==1.0\n", ["qabox_test_ext"])
    tiny_sdist(src / "wheels", "qabox-test-ext", compiled=True)
    result = qabox("build", src, "-o", tmp_path / "b.tar.gz", "--for", "lab1")
    assert result.code == 5 and not (tmp_path / "b.tar.gz").exists(), result
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("qabox: error:")]
    assert line.startswith(f"qabox: error: qabox-test-ext==1.0 has no wheel for lab1's python {host_python_version()} "
                           f"(linux-x86_64"), line
    assert "its sdist compiles code: build its wheel on such a host and put it in the project's wheels/" in line
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("lab")
@pytest.mark.network  # markupsafe's wheel for python 3.12
def test_a_build_for_another_python_is_refused_before_anything_is_sent(tmp_path, notes_build, env_name, port):
    assert qabox("deploy", notes_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    release = http_get("lab1", port, "/release")
    assert release[0] == 200
    notes = Path(__file__).resolve().parents[1] / "examples" / "notes"
    assert qabox("build", notes, "-o", tmp_path / "py312.tar.gz", "--python-version", "3.12").code == 0
    build_id = build_check.inspect(tmp_path / "py312.tar.gz").id

    result = qabox("deploy", tmp_path / "py312.tar.gz", "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 5 and len(result.stderr.strip().splitlines()) == 1, result
    message = result.stderr.strip()
    assert message.startswith("qabox: error: py312.tar.gz: wheels/markupsafe-") and "-cp312-cp312-" in message, message
    assert f"does not install on lab1's python {host_python_version()} (linux-x86_64" in message, message
    assert message.endswith("(the build was resolved for python 3.12): make the build for it with "
                            "`qabox build --for lab1`"), message
    sent = in_host("lab1", "sh", "-c", f"ls {LAB_HOME}/.qabox/manifests/ {LAB_HOME}/.qabox/uploads/ | grep -c {build_id}")
    assert sent.stdout.strip() == "0"  # neither its manifest nor any of its content
    assert http_get("lab1", port, "/release") == release  # the current release still serves


def test_a_build_the_host_cannot_install_is_refused_naming_the_wheel_or_the_requirement(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "wsgi.py").write_text("app = None\n")
    here = {"python": "3.11.7", "implementation": "cpython", "platform": "linux-x86_64", "glibc": "2.36"}
    story = 'async-timeout>=4.0.2; python_full_version <= "3.11.2"'  # issue 14's, resolved here for 3.11.7
    pack(src, tmp_path / "b.tar", extra={"requirements.txt": f"werkzeug\n{story}  # for aiohttp\n".encode(),
                                         build_check.RESOLVED_FOR: json.dumps(here).encode(),
                                         "wheels/werkzeug-3.1.9-py3-none-any.whl": b"a wheel"})
    build = build_check.inspect(tmp_path / "b.tar")
    lab1 = Target(python="3.11.2", glibc="2.36", pip="23.0.1", name="lab1's python")
    with pytest.raises(BuildError) as refused:
        host_python.check_build(build, lab1, "lab1")
    assert refused.value.message == (
        f"b.tar: requirements.txt: `{story}  # for aiohttp` applies on lab1's python 3.11.2 (linux-x86_64, "
        "glibc 2.36, pip 23.0.1), but not on python 3.11.7, which the build's wheels were resolved for: make the "
        "build for it with `qabox build --for lab1`")
    host_python.check_build(build, dataclasses.replace(lab1, python="3.11.7"), "lab1")  # as resolved: fine
    with pytest.raises(BuildError) as refused:
        host_python.check_build(build, dataclasses.replace(lab1, python="3.6.15", abiflags="m", pip="18.1"), "lab1")
    assert "applies on lab1's python 3.6.15" in refused.value.message  # its wheel is py3-none-any: fine there


def test_every_build_records_the_python_it_was_resolved_for(tmp_path):
    record = {"python": "3.11.2", "implementation": "cpython", "platform": "linux-x86_64", "glibc": "2.36",
              "pip": "23.0.1", "abiflags": "", "soabi": "cpython-311-x86_64-linux-gnu", "name": "lab1's python"}
    assert build_check.read_resolved_for(json.dumps(record)) == record
    assert Target.from_json(record, "lab1's python").to_json() == record
    assert build_check.read_resolved_for("not json") is None and build_check.read_resolved_for("[]") is None


def test_the_hosts_app_servers_ride_along_but_stay_out_of_a_builds_record():
    """upload-state tells the servers with the python: they decide nothing about wheels, so a build made
    for a host is not made for another one (nor rebuilt) when the host installs gunicorn."""
    info = {"python": "3.11.2", "implementation": "cpython", "platform": "linux-x86_64", "glibc": "2.36",
            "pip": "23.0.1", "abiflags": "", "soabi": "cpython-311-x86_64-linux-gnu", "servers": ["waitress"]}
    lab1 = host_python.told(info, "lab1")
    assert lab1.servers == ("waitress",) and lab1.name == "lab1's python"
    assert "servers" not in lab1.to_json() and lab1 == host_python.told(dict(info, servers=[]), "lab1")
    assert Target.from_json(lab1.to_json(), "lab1's python").servers is None  # a record tells none
