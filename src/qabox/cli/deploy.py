"""``qabox deploy``: one host with a progress bar, or several with a line each, then a table."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.filesize import decimal

from qabox.cli.options import make_context
from qabox.cli.output import err, out, print_json, print_table, reporting


def deploy(
    ctx: typer.Context,
    build: Path = typer.Argument(..., metavar="BUILD", help="The build (a .tar, .tar.gz, .tar.bz2 or .tar.xz file), or a project directory to build for the host first."),
    host: List[str] = typer.Option(..., "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME`, or a group from hosts/groups.toml; repeat for several."),
    env: str = typer.Option("main", "--env", "-e", metavar="ENV", help="Env on the host (several can run side by side)."),
    port: Optional[int] = typer.Option(None, "--port", metavar="N", help="App port on the host's loopback (default: hosts file, else 8080)."),
    entry: Optional[str] = typer.Option(None, "--app", metavar="MOD:APP", help="WSGI entry module:callable, overriding qabox.toml."),
    lock_timeout: float = typer.Option(60, "--lock-timeout", metavar="SECONDS", help="Seconds to wait for another deploy to finish."),
    on_boot: bool = typer.Option(False, "--on-boot", help="Also bring the host's envs back after it reboots (an @reboot crontab entry)."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help="Trust and record the host key if it is not known yet."),
    parallel: int = typer.Option(8, "--parallel", metavar="N", help="With several hosts: how many at once."),
    serial: bool = typer.Option(False, "--serial", help="With several hosts: one after another (a rolling deploy)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="With several hosts: start no more after a failure."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Deploying a directory: build it again even if unchanged (requirements resolved afresh)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Deploy a build to a host (or several) and serve it there, supervised.

    Example: qabox deploy build.tar.gz --host oldbox --env main (or a project: qabox deploy . --host oldbox)
    """
    with reporting(ctx, as_json):
        context = make_context(ctx, accept_new_host_key)
        hosts = context.expand(host)
        checking = None
        if len(hosts) == 1 and build.is_file():  # checked while the SSH stack loads, then connects
            from qabox.build_check import check_early

            checking = check_early(context, hosts[0], build, entry)
        from qabox.commands import deploy as deploying

        options = dict(env=env, port=port, entry=entry, lock_timeout=lock_timeout, on_boot=on_boot,
                       rebuild=rebuild)
        if len(hosts) > 1:
            with fleet_progress(hosts, enabled=not as_json) as hooks_for:
                rows = deploying.deploy_many(context, hosts, build, 1 if serial else parallel, fail_fast,
                                             hooks_for, **options)
            print_fleet(ctx, rows, as_json)
            return
        with deploy_progress(enabled=not as_json) as hooks:
            result = deploying.deploy(context, hosts[0], build, hooks=hooks, checking=checking, **options)
        if as_json:
            print_json(ctx, result.to_json())
            return
        where = f"{result.host}/{result.env}"
        if result.built:
            done = f"built for {result.host}" if result.built == "built" else "unchanged: its cached build reused"
            out.print(f"{build}: {done}", markup=False, highlight=False)
        if not result.changed:
            out.print(f"{where} already runs this build as release {result.release}: "
                      f"nothing changed ({result.seconds:.1f} s)")
            return
        out.print(f"[green]✓[/] {where}: release [bold]{result.release}[/] is live "
                  f"({result.file}, {result.seconds:.1f} s, sent {decimal(result.sent_bytes)})")
        out.print(f"  serving on the host at {result.url} (previous release: {result.previous or 'none'})")
        out.print(f"  testers connect with: qabox tunnel --host {result.host} --env {result.env} --user NAME")
        if result.entry_reason:
            out.print(f"  entry {result.entry}: {result.entry_reason} (name another with --app or [app] entry)",
                      markup=False, highlight=False)
        if result.snapshot_skipped:
            out.print(f"  warning: {result.snapshot_skipped}", markup=False, highlight=False)
        if result.testers:
            names = ", ".join(f"{t['name']} (from {t['from']})" for t in result.testers)
            out.print(f"  connected testers, told of this release: {names}")


def print_fleet(ctx: typer.Context, rows: list[dict], as_json: bool) -> None:
    """A row per host; exit 1 if any failed."""
    failed = [f"{r['host']}: {r['result']}" for r in rows if not r["ok"]]
    if as_json:
        print_json(ctx, {"hosts": rows}, failed="; ".join(failed))
    else:
        table, notes = [], []
        for r in rows:
            result, _, why = r["result"].partition(": ")  # "failed: why"
            table.append((r["host"], r["release"] or "-", f"[{'green' if r['ok'] else 'red'}]{result}[/]",
                          f"{r['seconds']:.1f}" if r["seconds"] else "-"))
            notes += [f"{r['host']}: {why}"] if why else []
        print_table(("HOST", "RELEASE", "RESULT", "SECONDS"), table, key=("HOST", "RELEASE", "RESULT"),
                    notes=notes)
    if failed:
        raise typer.Exit(1)


@contextmanager
def fleet_progress(hosts: list[str], enabled: bool):
    """A progress line per host; yields the Hooks of each host."""
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn

    from qabox.commands.deploy import Hooks

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        DownloadColumn(), console=err, transient=True, disable=not (enabled and err.is_terminal))
    with progress:
        tasks = {h: progress.add_task(f"{h}: waiting", total=None) for h in hosts}

        def hooks_for(host: str) -> Hooks:
            return Hooks(step=lambda text: progress.update(tasks[host], description=f"{host}: {text}"),
                         upload=lambda sent, total: progress.update(tasks[host], completed=sent, total=total))

        yield hooks_for


@contextmanager
def deploy_progress(enabled: bool):
    """A spinner for the deploy's steps and a progress bar for its upload."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                               TransferSpeedColumn)

    from qabox.commands.deploy import Hooks

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        DownloadColumn(), TransferSpeedColumn(), console=err, transient=True,
                        disable=not (enabled and err.is_terminal))  # off one, it left a blank line
    with progress:
        step = progress.add_task("starting", total=None)
        upload_task = []

        def on_upload(sent: int, total: int) -> None:
            if not upload_task:
                upload_task.append(progress.add_task("uploading", total=total))
            progress.update(upload_task[0], completed=sent)

        yield Hooks(step=lambda text: progress.update(step, description=text), upload=on_upload)
