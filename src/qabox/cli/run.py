"""``qabox run``: a one-off command on the host, exiting with the command's exit status."""

from __future__ import annotations

import sys
from typing import List

import typer

from qabox.cli.options import ENV, HOST, make_context
from qabox.cli.output import reporting


def run(ctx: typer.Context, host: str = HOST, env: str = ENV,
        no_tty: bool = typer.Option(False, "--no-tty", "-T",
                                    help="No terminal on the host, even when this side has one."),
        command: List[str] = typer.Argument(..., metavar="-- CMD [ARGS]...",
                                            help="The command and its arguments, after --.")):
    """Run a command in the env's current release (its directory, virtualenv, environment
    and QABOX_DATA_DIR), passing stdin, stdout and stderr through; exit with its exit status.

    With a terminal here, the command gets one on the host (prompts and Ctrl-C work, like ssh -t).
    The arguments reach the host as they are, never through a shell.

    Example: qabox run --host oldbox -- python manage.py createsuperuser
    """
    with reporting(ctx):
        from qabox.commands.run import run as run_command

        terminal = not no_tty and sys.stdin.isatty() and sys.stdout.isatty()
        code = run_command(make_context(ctx), host, env, command, sys.stdin.buffer, sys.stdout.buffer,
                           sys.stderr.buffer, terminal)
    raise typer.Exit(code)
