"""qabox build: what goes in, what stays out, reproducibly."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from conftest import REPO, qabox
from qabox.commands import build
from qabox.errors import BuildError


@pytest.fixture
def project(tmp_path):
    src = tmp_path / "proj"
    shutil.copytree(REPO / "examples" / "notes", src)
    (src / ".gitignore").write_text("*.log\nnode_modules/\n")
    (src / "debug.log").write_text("noise")
    (src / "node_modules").mkdir()
    (src / "node_modules" / "x.js").write_text("x")
    (src / "tests").mkdir()
    (src / "tests" / "test_x.py").write_text("")
    (src / ".env").write_text("SECRET=1")
    (src / "qabox.toml").write_text((src / "qabox.toml").read_text() + '\n[build]\nexclude = ["tests/"]\n')
    return src


def names(path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def test_build_honours_gitignore_and_exclude_and_warns_of_secrets(project, tmp_path):
    report = build.make(project, tmp_path / "b.tar.gz")
    files = names(report.path)
    assert "notes.py" in files and "qabox.toml" in files and "requirements.txt" in files
    assert not [f for f in files if f.endswith(".log") or f.startswith(("node_modules", "tests/"))]
    assert report.wheels >= 1 and any(f.startswith("wheels/flask-") for f in files)
    assert report.secrets == (".env",) and report.entry == "notes:app"


def test_build_is_reproducible(project, tmp_path):
    first = build.make(project, tmp_path / "1.tar.gz").path.read_bytes()
    (project / "notes.py").touch()
    assert build.make(project, tmp_path / "2.tar.gz").path.read_bytes() == first


def test_build_cli_prints_what_went_in(project, tmp_path):
    result = qabox("build", project, "-o", tmp_path / "c.tar.gz")
    assert result.code == 0, result
    assert "files" in result.stdout and "wheels" in result.stdout
    assert "warning" in result.stderr and ".env" in result.stderr


def test_bad_exclude_and_missing_dir(project, tmp_path):
    (project / "qabox.toml").write_text('[build]\nexclude = "tests/"\n')
    with pytest.raises(BuildError, match="exclude must be a list"):
        build.make(project, tmp_path / "d.tar.gz")
    with pytest.raises(BuildError, match="is not a directory"):
        build.make(tmp_path / "nope", tmp_path / "e.tar.gz")


def test_build_app_writes_the_entry_into_the_builds_qabox_toml(project, tmp_path):
    result = qabox("build", project, "-o", tmp_path / "e.tar.gz", "--app", 'notes:create_app("qa")')
    assert result.code == 0, result
    assert 'entry notes:create_app("qa")' in result.stdout
    with tarfile.open(tmp_path / "e.tar.gz") as tar:
        written = tar.extractfile("qabox.toml").read().decode()
    assert 'entry = "notes:create_app(\\"qa\\")"' in written and 'entry = "notes:app"' not in written
    assert '[build]\nexclude = ["tests/"]' in written  # the rest of it as it was
    assert 'entry = "notes:app"' in (project / "qabox.toml").read_text()  # the project's own is untouched


def test_build_says_which_entry_it_picked_and_why(tmp_path):
    src = tmp_path / "bare"
    src.mkdir()
    (src / "wsgi.py").write_text("def app(environ, start_response):\n    pass\n")
    result = qabox("build", src, "-o", tmp_path / "w.tar.gz")
    assert result.code == 0, result
    assert "entry wsgi:app: none given, and the build has wsgi.py" in result.stdout


def pyproject_project(tmp_path, dependencies: list[str]):
    src = tmp_path / "flaskr"
    (src / "flaskr").mkdir(parents=True)
    (src / "flaskr" / "__init__.py").write_text("def create_app(test_config=None):\n    pass\n")
    deps = ", ".join(f'"{d}"' for d in dependencies)
    (src / "pyproject.toml").write_text(f'[project]\nname = "flaskr"\nversion = "1.0.0"\ndependencies = [{deps}]\n'
                                        '\n[build-system]\nrequires = ["flit_core<4"]\nbuild-backend = "flit_core.buildapi"\n')
    return src


def test_a_pyproject_project_brings_its_dependencies_and_its_code_as_it_is(tmp_path):
    report = build.make(pyproject_project(tmp_path, ["flask>=3"]), tmp_path / "f.tar.gz")
    assert report.requirements == "pyproject.toml's [project] dependencies"
    with tarfile.open(report.path) as tar:
        assert tar.extractfile("requirements.txt").read() == b"flask>=3\n"
    files = names(report.path)
    assert "flaskr/__init__.py" in files and any(f.startswith("wheels/flask-") for f in files)
    assert any(f.startswith("wheels/werkzeug-") for f in files) and not any("flaskr-" in f for f in files)
    assert report.entry == "flaskr:create_app()"


def test_a_build_whose_requirements_do_not_bring_werkzeug_gets_it(tmp_path):
    src = pyproject_project(tmp_path, ["markupsafe"])
    result = qabox("build", src, "-o", tmp_path / "m.tar.gz")
    assert result.code == 0, result
    assert "requirements: pyproject.toml's [project] dependencies, and werkzeug (qabox's app server)" in result.stdout
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        assert tar.extractfile("requirements.txt").read() == b"markupsafe\nwerkzeug\n"
    (src / "requirements.txt").write_text("markupsafe")  # its own, without a newline: kept, and werkzeug added
    build.make(src, tmp_path / "r.tar.gz")
    with tarfile.open(tmp_path / "r.tar.gz") as tar:
        assert tar.extractfile("requirements.txt").read() == b"markupsafe\nwerkzeug\n"


def test_dynamic_or_bad_pyproject_dependencies_are_refused(tmp_path):
    src = pyproject_project(tmp_path, ["not a requirement!"])
    with pytest.raises(BuildError, match=r"\[project\] dependencies: 'not a requirement!' is not a requirement"):
        build.make(src, tmp_path / "x.tar.gz")
    (src / "pyproject.toml").write_text('[project]\nname = "x"\ndynamic = ["dependencies"]\n')
    with pytest.raises(BuildError, match="its dependencies are dynamic"):
        build.make(src, tmp_path / "y.tar.gz")
