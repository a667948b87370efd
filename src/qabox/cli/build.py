"""``qabox build``: what the build holds, and a warning for each file that looks like a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.filesize import decimal

from qabox.cli.options import make_context
from qabox.cli.output import err, out, reporting


def build(
    ctx: typer.Context,
    src: Path = typer.Argument(Path("."), metavar="DIR", help="The project directory (default: here)."),
    output: Path = typer.Option(Path("build.tar.gz"), "-o", "--output", metavar="FILE", help="The build file to write."),
    for_host: Optional[str] = typer.Option(None, "--for", metavar="HOST", help="Resolve the wheels for this host's python, platform and pip (asked over SSH)."),
    python_version: Optional[str] = typer.Option(None, "--python-version", metavar="X.Y", help="Without --for: resolve for this Python, e.g. 3.11."),
    platform: Optional[str] = typer.Option(None, "--platform", metavar="TAG", help="Without --for: take wheels of this platform tag only, e.g. manylinux2014_x86_64."),
    entry: Optional[str] = typer.Option(None, "--app", metavar="MOD:APP", help="The WSGI entry, module:app or module:create_app() for a factory, written into the build's qabox.toml."),
):
    """Pack a project into a build: its files and a wheelhouse of its requirements.

    Example: qabox build . -o build.tar.gz --for oldbox --app 'flaskr:create_app()'
    """
    with reporting(ctx):
        from qabox.commands.build import BOTH_TARGETS, make, target_of
        from qabox.errors import BuildError

        if for_host and (python_version or platform):
            raise BuildError(BOTH_TARGETS)  # before connecting
        target = target_of(make_context(ctx), for_host) if for_host else None
        report = make(src, output, python_version, platform, entry, target)
        out.print(f"{report.path}: {report.files} files, {report.wheels} wheels, "
                  f"{decimal(report.size)}, entry {report.entry}", markup=False, highlight=False)
        out.print(f"  requirements: {report.requirements}", markup=False, highlight=False)
        out.print(f"  wheels for {report.target}", markup=False, highlight=False)
        if report.built:
            out.print(f"  built here from their sdists: {', '.join(report.built)}", markup=False, highlight=False)
        if report.entry_reason:
            out.print(f"  entry {report.entry}: {report.entry_reason} (name another with --app or "
                      f"[app] entry in qabox.toml)", markup=False, highlight=False)
        for secret in report.secrets:
            err.print(f"qabox: warning: {secret} looks like a secret and is in the build: "
                      f"add it to .gitignore or [build] exclude in qabox.toml", markup=False, highlight=False)
