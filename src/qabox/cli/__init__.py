"""The command line: parse, build a Context, call one core function (``qabox.commands``),
print its result (``output``: tables, or the JSON envelope with --json).

Errors are caught in one place (``output.reporting``): one line on stderr, the
traceback only with -v, and a non-zero exit code that says what kind. The core
is imported inside each command, so that ``qabox --help`` loads no paramiko.
"""

from __future__ import annotations

import typer

from qabox.cli import (build, config, debug, deploy, errors, hosts, join, lifecycle, logs, run, status, testers,
                       tunnel)
from qabox.cli.options import main_options

app = typer.Typer(
    help="Turn a spare Linux box into a QA environment over SSH.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(main_options)
for command in (deploy.deploy, status.status, lifecycle.start, lifecycle.stop, lifecycle.restart,
                lifecycle.rollback, lifecycle.releases, logs.logs, run.run, debug.debug, tunnel.tunnel):
    app.command()(command)
app.command("tunnels")(tunnel.tunnels_list)
app.command("build")(build.build)
app.command("join")(join.join)
app.add_typer(hosts.app, name="hosts")
app.add_typer(testers.app, name="testers")
app.add_typer(config.app, name="config")
app.add_typer(errors.app, name="errors")


def main() -> None:
    app(prog_name="qabox")
