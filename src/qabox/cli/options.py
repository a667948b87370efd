"""The global options, the context they make, and the options several commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qabox import __version__
from qabox.cli.output import out


def print_version(value: bool) -> None:
    if value:
        out.print(f"qabox {__version__}")
        raise typer.Exit()


def main_options(
    ctx: typer.Context,
    ssh_config: Optional[Path] = typer.Option(
        None, "--ssh-config", envvar="QABOX_SSH_CONFIG", metavar="FILE",
        help="ssh_config file to use instead of ~/.ssh/config."),
    hosts_dir: Optional[Path] = typer.Option(
        None, "--hosts-dir", envvar="QABOX_HOSTS_DIR", metavar="DIR",
        help="Directory of hosts/NAME.toml settings files (default: ./hosts)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks of errors."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=print_version,
                                 help="Print the version and exit."),
):
    """Turn a spare Linux box into a QA environment over SSH.

    Example: qabox deploy build.tar.gz --host oldbox
    """
    ctx.obj = {"ssh_config": ssh_config, "hosts_dir": hosts_dir, "verbose": verbose}


def make_context(ctx: typer.Context, accept_new_host_key: bool = False):
    """The Context of the global options (only commands import qabox.context)."""
    from qabox.context import Context

    return Context.create(ctx.obj["ssh_config"], ctx.obj["hosts_dir"], accept_new_host_key)


HOST = typer.Option(..., "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME`.")
HOSTS = typer.Option(..., "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME`, or a group; repeat for several.")
ENV = typer.Option("main", "--env", "-e", metavar="ENV", help="Env on the host.")
LOCK_TIMEOUT = typer.Option(60, "--lock-timeout", metavar="SECONDS", help="Seconds to wait for a deploy in progress.")
