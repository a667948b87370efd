"""The command line: parse, build a Context, call the core, print the result.

Errors are caught in one place (``reporting``): one line on stderr, the
traceback only with -v, and a non-zero exit code that says what kind.
"""

from __future__ import annotations

import json
import textwrap
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                           TransferSpeedColumn)
from rich.text import Text

from qabox import __version__, deploy as deploying, ops, ssh
from qabox.agent import rules
from qabox.context import Context, check_env
from qabox.errors import ConfigError, QaboxError
from qabox.hosts import expand
from qabox.status import status as get_status

app = typer.Typer(
    help="Turn a spare Linux box into a QA environment over SSH.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
hosts_app = typer.Typer(help="Hosts: list them, check them, trust their keys.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
testers_app = typer.Typer(help="Testers: keys that reach the app through a tunnel and nothing else.",
                          no_args_is_help=True)
app.add_typer(testers_app, name="testers")

out = Console(soft_wrap=True)  # one line stays one line, for people and for grep
err = Console(stderr=True, soft_wrap=True)


@contextmanager
def reporting(verbose: bool = False, as_json: bool = False):
    """Turn a QaboxError into one line on stderr and its exit code."""
    try:
        yield
    except QaboxError as e:
        if verbose:
            err.print(traceback.format_exc(), markup=False, highlight=False)
        for line in e.log:
            err.print(f"  | {line}", markup=False, highlight=False, style="dim")
        if as_json:
            print(json.dumps({"ok": False, "error": {"code": e.code or type(e).__name__,
                                                     "message": e.message}}))
        err.print(f"qabox: error: {e.message}", markup=False, highlight=False)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("qabox: interrupted")
        raise typer.Exit(130)


def print_version(value: bool) -> None:
    if value:
        out.print(f"qabox {__version__}")
        raise typer.Exit()


@app.callback()
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


def make_context(ctx: typer.Context, accept_new_host_key: bool = False) -> Context:
    return Context.create(ctx.obj["ssh_config"], ctx.obj["hosts_dir"], accept_new_host_key)


@app.command()
def deploy(
    ctx: typer.Context,
    build: Path = typer.Argument(..., metavar="BUILD", help="The build: a .tar, .tar.gz, .tar.bz2 or .tar.xz file."),
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
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Deploy a build to a host (or several) and serve it there, supervised.

    Example: qabox deploy build.tar.gz --host oldbox --env main
    """
    with reporting(ctx.obj["verbose"], as_json):
        context = make_context(ctx, accept_new_host_key)
        hosts = expand(host, context.hosts_dir)
        if len(hosts) > 1:
            deploy_fleet(context, hosts, build, 1 if serial else parallel, fail_fast, as_json,
                         env=env, port=port, entry=entry, lock_timeout=lock_timeout, on_boot=on_boot)
            return
        host = hosts[0]
        with deploy_progress(enabled=not as_json) as hooks:
            result = deploying.deploy(context, host, build, env=env, port=port, entry=entry,
                                      lock_timeout=lock_timeout, on_boot=on_boot, hooks=hooks)
        if as_json:
            print(json.dumps(result.to_json(), indent=2))
            return
        where = f"{result.host}/{result.env}"
        if not result.changed:
            out.print(f"{where} already runs this build as release {result.release}: "
                      f"nothing changed ({result.seconds:.1f} s)")
            return
        out.print(f"[green]✓[/] {where}: release [bold]{result.release}[/] is live "
                  f"({result.file}, {result.seconds:.1f} s, sent {decimal(result.sent_bytes)})")
        out.print(f"  serving on the host at {result.url} (previous release: {result.previous or 'none'})")
        out.print(f"  testers connect with: qabox tunnel --host {result.host} --env {result.env} --user NAME")
        if result.testers:
            names = ", ".join(f"{t['name']} (from {t['from']})" for t in result.testers)
            out.print(f"  connected testers, told of this release: {names}")


def deploy_fleet(context: Context, hosts: list, build: Path, parallel: int, fail_fast: bool,
                 as_json: bool, **options) -> None:
    """Deploy to several hosts: a progress line per host, then a table; exit 1 if any failed."""
    from qabox.fleet import deploy_many

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        DownloadColumn(), console=err, transient=True, disable=as_json or not err.is_terminal)
    with progress:
        tasks = {h: progress.add_task(f"{h}: waiting", total=None) for h in hosts}

        def hooks_for(host: str) -> deploying.Hooks:
            return deploying.Hooks(
                step=lambda text: progress.update(tasks[host], description=f"{host}: {text}"),
                upload=lambda sent, total: progress.update(tasks[host], completed=sent, total=total))

        rows = deploy_many(context, hosts, build, parallel, fail_fast, hooks_for, **options)
    if as_json:
        print(json.dumps({"hosts": rows}, indent=2))
    else:
        table, notes = [], []
        for r in rows:
            result, _, why = r["result"].partition(": ")  # "failed: why"
            table.append((r["host"], r["release"] or "-", f"[{'green' if r['ok'] else 'red'}]{result}[/]",
                          f"{r['seconds']:.1f}" if r["seconds"] else "-"))
            notes += [f"{r['host']}: {why}"] if why else []
        print_table(("HOST", "RELEASE", "RESULT", "SECONDS"), table, key=("HOST", "RELEASE", "RESULT"),
                    notes=notes)
    if not all(r["ok"] for r in rows):
        raise typer.Exit(1)


@contextmanager
def deploy_progress(enabled: bool):
    """A spinner for the deploy's steps and a progress bar for its upload."""
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

        yield deploying.Hooks(step=lambda text: progress.update(step, description=text),
                              upload=on_upload)


def print_table(columns: tuple, rows: list, key: tuple = (), notes: list = ()) -> None:
    """Rows under their headers, then free text (an unreachable host's reason) as
    notes below, one each, never squeezed into a column.

    On a terminal too narrow for every column, the ``key`` columns (what names a
    row) stay whole and each row's other columns follow it as ``name: value``
    lines; off a terminal, one line per row however wide, for grep and logs.
    """
    width = out.width if out.is_terminal else None
    for line in table_lines(columns, rows, key, width):
        out.print(line)
    for note in notes:
        for line in textwrap.wrap(note, width, subsequent_indent="  ", break_long_words=False,
                                  break_on_hyphens=False) if width else [note]:
            out.print(line, markup=False, highlight=False)


def table_lines(columns: tuple, rows: list, key: tuple = (), width: int | None = None) -> list[Text]:
    """The lines print_table prints: every column if they fit in ``width`` (None:
    no limit), else the key columns, with the others below each row."""
    header = [Text(c, style="bold") for c in columns]
    cells = [[Text.from_markup(c) for c in row] for row in rows]

    def widths(keep: list) -> dict:
        return {i: max(r[i].cell_len for r in [header, *cells]) for i in keep}

    keep = list(range(len(columns)))
    if width is not None and sum(widths(keep).values()) + 2 * (len(keep) - 1) > width:
        keep = [i for i, c in enumerate(columns) if c in key]
    sizes = widths(keep)

    def line(row: list) -> Text:
        text = Text()
        for n, i in enumerate(keep):
            text.append("  " if n else "").append_text(row[i]).append(" " * (sizes[i] - row[i].cell_len))
        text.rstrip()
        return text

    lines = [line(header)]
    for row in cells:
        lines.append(line(row))
        if len(keep) < len(columns):
            lines += detail_lines([(columns[i].lower(), row[i]) for i in range(len(columns))
                                   if i not in keep and row[i].plain not in ("", "-")], width)
    return lines


def detail_lines(items: list, width: int) -> list[Text]:
    """``name: value`` items, indented, as many to a line as fit in width."""
    lines, current = [], Text("  ")
    for name, value in items:
        item = Text(f"{name}: ", style="dim").append_text(value)
        if current.plain.strip() and current.cell_len + 2 + item.cell_len > width:
            lines.append(current)
            current = Text("  ")
        current.append("  " if current.plain.strip() else "").append_text(item)
    if current.plain.strip():
        lines.append(current)
    return lines


@app.command()
def status(
    ctx: typer.Context,
    host: Optional[List[str]] = typer.Option(None, "--host", "-H", metavar="HOST", help="Host(s) to ask (default: every host deployed to from here)."),
    env: Optional[str] = typer.Option(None, "--env", "-e", metavar="ENV", help="Only this env."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
):
    """Show what is deployed where, and whether it is up.

    Example: qabox status --host oldbox --json
    """
    with reporting(ctx.obj["verbose"], as_json):
        context = make_context(ctx)
        names = expand(host, context.hosts_dir) if host else context.remembered_hosts()
        if not names:
            raise ConfigError("no hosts known yet: name one with --host NAME")
        if env:
            check_env(env)
        hosts = get_status(context, names, env)
        if as_json:
            print(json.dumps({"hosts": hosts}, indent=2))
        else:
            print_status(hosts)
        problems = [f"{h['host']}/{e['env']}: {p}" for h in hosts for e in h["envs"] for p in e.get("problems") or []]
        if not as_json:
            for problem in problems:
                err.print(f"qabox: error: {problem}", markup=False, highlight=False)
        if problems or any(h["error"] for h in hosts):
            raise typer.Exit(1)


def print_status(hosts: list[dict]) -> None:
    rows, notes = [], []
    for host in hosts:
        if not host["reachable"]:
            rows.append((host["host"], "-", "-", "[red]unreachable[/]") + ("",) * 7)
            notes.append(f"{host['host']}: {host['error']}")
        elif host["error"]:  # the env asked for is not there
            rows.append((host["host"], host["env"], "-", "[red]no such env[/]") + ("",) * 7)
            notes.append(host["error"])
        elif not host["envs"]:
            rows.append((host["host"], "-", "nothing deployed") + ("",) * 8)
        for e in host["envs"]:
            style = {"running": "green", "starting": "yellow"}.get(e["state"], "red")
            health = e.get("health") or {}
            rows.append((
                host["host"], e["env"], e["release"] or "-", f"[{style}]{e['state']}[/]",
                str(e["pid"] or "-"), human_seconds(e["uptime"]), str(e["restarts"]), str(e["port"]),
                f"{health['code']} {health['ms']:.0f} ms" if health.get("code") else (health.get("error") or "-"),
                f"{e['deployed_at']} by {e['deployed_by']}" if e["deployed_at"] else "-",
                ", ".join(f"{t['name']} ({t['requests']} req)" for t in e.get("testers", [])) or "-",
            ))
    print_table(("HOST", "ENV", "RELEASE", "STATE", "PID", "UPTIME", "RESTARTS", "PORT", "HEALTH",
                 "DEPLOYED", "TESTERS"), rows, key=("HOST", "ENV", "RELEASE", "STATE", "PORT"), notes=notes)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


HOST = typer.Option(..., "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME`.")
HOSTS = typer.Option(..., "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME`, or a group; repeat for several.")
ENV = typer.Option("main", "--env", "-e", metavar="ENV", help="Env on the host.")
LOCK_TIMEOUT = typer.Option(60, "--lock-timeout", metavar="SECONDS", help="Seconds to wait for a deploy in progress.")


def change_env(ctx: typer.Context, cmd: str, hosts: list, env: str, lock_timeout: float,
               as_json: bool, **args) -> None:
    """start/stop/restart/rollback on one host or several (in parallel), under the deploy lock."""
    from concurrent.futures import ThreadPoolExecutor

    with reporting(ctx.obj["verbose"], as_json):
        context = make_context(ctx)
        names = expand(hosts, context.hosts_dir)
        if len(names) == 1:
            results = [(names[0], ops.change(context, names[0], env, cmd, lock_timeout, **args), None)]
        else:
            def one(host: str):
                try:
                    return host, ops.change(context, host, env, cmd, lock_timeout, **args), None
                except QaboxError as e:
                    return host, None, e.message

            with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
                results = list(pool.map(one, names))
        if as_json:
            rows = [{"host": h, "ok": e is None, "result": r, "error": e} for h, r, e in results]
            print(json.dumps(rows[0]["result"] if len(rows) == 1 else {"hosts": rows}, indent=2))
        for host, result, error in results:
            if error:
                err.print(f"qabox: error: {error}", markup=False, highlight=False)
            elif not as_json:
                out.print(change_message(cmd, f"{host}/{env}", result), markup=False, highlight=False)
        if any(error for _, _, error in results):
            raise typer.Exit(1)


def change_message(cmd: str, where: str, result: dict) -> str:
    release = result.get("release")
    if not result.get("changed"):
        return {"start": f"{where}: already running release {release}",
                "stop": f"{where}: already stopped",
                "rollback": f"{where}: already on release {release}"}[cmd]
    return {"start": f"{where}: release {release} is running",
            "stop": f"{where}: stopped",
            "restart": f"{where}: release {release} restarted (pid {result.get('pid')})",
            "rollback": f"{where}: rolled back to release {release} (was {result.get('previous')})"}[cmd]


@app.command()
def start(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
          as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Start an env's current release (also after a crash loop).

    Example: qabox start --host oldbox --env main
    """
    change_env(ctx, "start", host, env, lock_timeout, as_json)


@app.command()
def stop(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
         as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Stop an env's app gracefully (in-flight requests finish).

    Example: qabox stop --host oldbox --env main
    """
    change_env(ctx, "stop", host, env, lock_timeout, as_json)


@app.command()
def restart(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Restart an env's app with no failed requests: new process first, then the old one goes.

    Example: qabox restart --host oldbox
    """
    change_env(ctx, "restart", host, env, lock_timeout, as_json)


@app.command()
def rollback(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV,
             to: Optional[str] = typer.Option(None, "--to", metavar="RELEASE", help="Release id to go back to (default: the previous one)."),
             lock_timeout: float = LOCK_TIMEOUT,
             as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Go back to the previous (or a named) release, health-checked, with no failed requests.

    Example: qabox rollback --host oldbox --to 20261124-104000
    """
    if to is not None and not rules.RELEASE_ID.fullmatch(to):
        with reporting(ctx.obj["verbose"], as_json):
            raise ConfigError(f"--to {to!r} is not a release id (like 20261124-104000): see `qabox releases`")
    change_env(ctx, "rollback", host, env, lock_timeout, as_json, to=to)


@app.command()
def releases(ctx: typer.Context, host: str = HOST, env: str = ENV,
             as_json: bool = typer.Option(False, "--json", help="Print the releases as JSON.")):
    """List the releases kept on the host, which is current, and who deployed each.

    Example: qabox releases --host oldbox
    """
    with reporting(ctx.obj["verbose"], as_json):
        data = ops.releases(make_context(ctx), host, env)
        if as_json:
            print(json.dumps(data, indent=2))
            return
        print_table(("", "RELEASE", "DEPLOYED AT", "BY", "FILE", "SHA256"), [
            ("*" if r["current"] else "", r["release"], r.get("deployed_at") or "-",
             r.get("deployed_by") or "-", r.get("file") or "-", (r.get("sha256") or "")[:12])
            for r in data["releases"]], key=("", "RELEASE"))


@app.command()
def logs(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV,
         lines: int = typer.Option(50, "-n", "--lines", metavar="N", help="How many of the last lines to show."),
         follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines until Ctrl-C.")):
    """Show the app's output and access log from the host (or several, each line prefixed).

    Example: qabox logs --host oldbox -n 100 -f
    """
    import threading

    with reporting(ctx.obj["verbose"]):
        context = make_context(ctx)
        names = expand(host, context.hosts_dir)
        errors = []
        printing = threading.Lock()

        def follow_one(name: str) -> None:
            prefix = f"{name} | " if len(names) > 1 else ""

            def show(line: str) -> None:
                with printing:
                    print(prefix + line, flush=True)

            try:
                ops.logs(context, name, env, lines, follow, show)
            except QaboxError as e:
                errors.append(e)

        threads = [threading.Thread(target=follow_one, args=(n,), daemon=True) for n in names]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(0.1)
        except KeyboardInterrupt:
            return
        if len(errors) == 1 and len(names) == 1:
            raise errors[0]
        for e in errors:
            err.print(f"qabox: error: {e.message}", markup=False, highlight=False)
        if errors:
            raise typer.Exit(1)


@app.command()
def tunnel(
    ctx: typer.Context,
    user: Optional[str] = typer.Option(None, "--user", "-u", metavar="NAME", help="Tester name (as in `qabox testers add`)."),
    host: Optional[str] = typer.Option(None, "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME` "
                                       "(default: the tester's earlier tunnels' host, or the one host known)."),
    env: str = ENV,
    port: Optional[int] = typer.Option(None, "--port", metavar="N", help="Local port (default: the tester's own, stable)."),
    identity: Optional[str] = typer.Option(None, "-i", "--identity", metavar="KEYFILE", help="The tester's private key file."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background."),
    stop_: bool = typer.Option(False, "--stop", help="Stop the tester's background tunnel(s)."),
    all_: bool = typer.Option(False, "--all", help="With --stop: stop every tunnel on this machine."),
):
    """Open a tester's tunnel: a stable http://127.0.0.1:PORT to the env's app.

    Example: qabox tunnel --user tester2 --host oldbox
    """
    with reporting(ctx.obj["verbose"]):
        from qabox import tunnel as tunnels  # here: an incompatible paramiko is one line

        context = make_context(ctx)
        if stop_:
            if not (user or all_):
                raise ConfigError("say whose tunnel to stop: --stop --user NAME, or --stop --all")
            stopped = tunnels.stop_tunnels(context, None if all_ else user, None if all_ else host,
                                           None if all_ else (env if host else None))
            for r in stopped:
                out.print(f"stopped {r['user']}'s tunnel to {r['host']}/{r['env']} ({r['url']})")
            if not stopped:
                out.print("no such tunnel is running")
            return
        if not user:
            raise ConfigError("name the tester: qabox tunnel --user NAME [--host HOST]")
        check_env(env)
        check_env(user)
        host = host or tunnels.tester_host(context, user)
        tester = context.settings(host).testers.get(user, {})
        identity = identity or tester.get("key")
        identity = str(Path(identity).expanduser()) if identity else None
        local = tunnels.local_port(context, host, env, user, port or tester.get("port"))
        if detach:
            record = tunnels.detach(context, user, host, env, local, identity)
            out.print(f"{user}'s tunnel to {host}/{env} runs in the background: {record['url']}")
            out.print(f"  stop it with: qabox tunnel --stop --user {user}")
            return
        run_tunnel(context, tunnels, host, env, user, local, identity)


def run_tunnel(context, tunnels, host, env, user, port, identity) -> None:
    """Serve the tunnel in the foreground until Ctrl-C or SIGTERM: a header once it
    is up, then its status (one line rewritten in place on a terminal, else a line
    per change of state); nothing of it when it cannot start, only the error."""
    import signal as signals
    import threading

    done = threading.Event()
    live = err.is_terminal
    shown = {"up": False, "state": None, "width": 0}

    def on_change(status) -> None:
        recorder(status)
        if not shown["up"]:
            return
        state = f"{status.state}{' (' + status.reason + ')' if status.reason else ''}"
        line = f"{state}, {status.requests} requests served"
        if live:  # not err.print, which drops "\r"; padded over the longer line it replaces
            err.file.write("\r" + line.ljust(shown["width"]))
            err.file.flush()
            shown["width"] = len(line)
        elif state != shown["state"]:
            err.print(line, markup=False, highlight=False)
        shown["state"] = state

    def on_notice(text: str) -> None:
        err.print(("\n" if live else "") + text, markup=False, highlight=False)
        shown["width"] = 0

    t = tunnels.Tunnel(context, host, env, user, port, identity, on_change=lambda s: on_change(s),
                       on_notice=on_notice)
    recorder = tunnels.Recorder(context, t)
    signals.signal(signals.SIGTERM, lambda *_: done.set())
    try:
        with t:
            out.print(f"{user}'s tunnel to {host}/{env}: {t.url}  (Ctrl-C to stop)")
            shown["up"] = True
            on_change(t.status)
            while not done.wait(0.2):
                t.refresh()
                recorder(t.status)  # a count it skipped a moment ago
    except KeyboardInterrupt:
        pass
    finally:
        recorder.remove()
        if live and shown["up"]:
            err.print()


@app.command("tunnels")
def tunnels_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List the tunnels running on this machine.

    Example: qabox tunnels
    """
    with reporting(ctx.obj["verbose"], as_json):
        from qabox import tunnel as tunnels  # here: an incompatible paramiko is one line

        records = tunnels.running(make_context(ctx))
        if as_json:
            print(json.dumps({"tunnels": records}, indent=2))
            return
        print_table(("TESTER", "HOST", "ENV", "URL", "STATE", "SINCE", "REQUESTS", "PID"), [
            (r["user"], r["host"], r["env"], r["url"], r["state"],
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])), str(r["requests"]), str(r["pid"]))
            for r in records], key=("TESTER", "HOST", "ENV", "URL", "STATE"),
            notes=[f"{r['user']}'s tunnel to {r['host']}/{r['env']}: {r['state']} ({r['reason']})"
                   for r in records if r.get("reason")])


@testers_app.command("add")
def testers_add(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name (a-z, 0-9, -, _)."),
                key: Path = typer.Option(..., "--key", metavar="FILE", help="The tester's public key file (.pub)."),
                host: str = HOST, as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Let a tester's key reach the app's ports on a host, and nothing else.

    Example: qabox testers add tester2 --key tester2.pub --host oldbox
    """
    with reporting(ctx.obj["verbose"], as_json):
        result = ops.tester_add(make_context(ctx), host, name, key)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        ports = ", ".join(f"{e}: {p}" for e, p in sorted(result["ports"].items())) or "no envs yet"
        verb = "added" if result["changed"] else "already has this key"
        out.print(f"tester {name} {verb} on {host} ({result['fingerprint']}; ports {ports})")
        out.print(f"  they connect with: qabox tunnel --user {name} --host {host} -i THEIR_KEY")


@testers_app.command("remove")
def testers_remove(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name."), host: str = HOST):
    """Take a tester's key off a host.

    Example: qabox testers remove tester2 --host oldbox
    """
    with reporting(ctx.obj["verbose"]):
        check_env(name)
        ended = ops.tester_remove(make_context(ctx), host, name).get("disconnected", 0)
        out.print(f"tester {name} removed from {host}" + (f" (their {ended} open tunnel(s) ended)" if ended else ""))


@testers_app.command("list")
def testers_list(ctx: typer.Context, host: str = HOST,
                 as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List a host's testers: key fingerprints, their ports per env, who is connected.

    Example: qabox testers list --host oldbox
    """
    with reporting(ctx.obj["verbose"], as_json):
        data = ops.tester_list(make_context(ctx), host)
        if as_json:
            print(json.dumps(data, indent=2))
            return
        print_table(("TESTER", "FINGERPRINT", "ENVS (PORT)", "CONNECTED"), [
            (t["name"], t["fingerprint"], ", ".join(f"{e} ({p})" for e, p in sorted(t["ports"].items())) or "-",
             ", ".join(f"from {c['from']} since {c['since']}" for c in t["connected"]) or "-")
            for t in data["testers"]], key=("TESTER", "ENVS (PORT)"))


@app.command("build")
def build_cmd(
    ctx: typer.Context,
    src: Path = typer.Argument(Path("."), metavar="DIR", help="The project directory (default: here)."),
    output: Path = typer.Option(Path("build.tar.gz"), "-o", "--output", metavar="FILE", help="The build file to write."),
    python_version: Optional[str] = typer.Option(None, "--python-version", metavar="X.Y", help="The host's Python, e.g. 3.11 (see `qabox hosts check`)."),
    platform: Optional[str] = typer.Option(None, "--platform", metavar="TAG", help="The host's platform tag, e.g. manylinux2014_x86_64."),
):
    """Pack a project into a build: its files and a wheelhouse of its requirements.

    Example: qabox build . -o build.tar.gz --python-version 3.11
    """
    from qabox import bundle

    with reporting(ctx.obj["verbose"]):
        report = bundle.make(src, output, python_version, platform)
        out.print(f"{report.path}: {report.files} files, {report.wheels} wheels, "
                  f"{decimal(report.size)}, entry {report.entry}", markup=False, highlight=False)
        for secret in report.secrets:
            err.print(f"qabox: warning: {secret} looks like a secret and is in the build: "
                      f"add it to .gitignore or [build] exclude in qabox.toml", markup=False, highlight=False)


@hosts_app.command("list")
def hosts_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List the hosts known from hosts/ and ssh_config: address, user, port, envs.

    Example: qabox hosts list
    """
    from qabox import inventory

    with reporting(ctx.obj["verbose"], as_json):
        rows = inventory.list_hosts(make_context(ctx))
        if as_json:
            print(json.dumps({"hosts": rows}, indent=2))
            return
        print_table(("HOST", "ADDRESS", "USER", "PORT", "ENVS", "SETTINGS"), [
            (r["host"], r["address"], r["user"] or "-", str(r["port"]), ", ".join(r["envs"]) or "-",
             r["settings"] or "-") for r in rows], key=("HOST", "ADDRESS", "USER", "PORT"))


@hosts_app.command("check")
def hosts_check(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Host name, as for `ssh NAME`."),
                as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")):
    """Check that a host is ready for qabox: each check passes or says the fix.

    Example: qabox hosts check oldbox
    """
    from qabox import inventory

    with reporting(ctx.obj["verbose"], as_json):
        checks = inventory.check_host(make_context(ctx), name)
        if as_json:
            print(json.dumps({"host": name, "ok": all(c.ok for c in checks),
                              "checks": [c.__dict__ for c in checks]}, indent=2))
        else:
            for c in checks:
                mark = "[red]FAIL[/]" if not c.ok else "[yellow]warn[/]" if c.warning else "[green]pass[/]"
                fix = f"  → {c.fix}" if not c.ok or c.warning else ""
                out.print(f"{mark}  {c.name}: {c.detail}{fix}", highlight=False)
        if not all(c.ok for c in checks):
            raise typer.Exit(1)


@hosts_app.command("trust")
def hosts_trust(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME", help="Host name, as for `ssh NAME`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Trust without asking."),
):
    """Show a host's key fingerprint and add it to known_hosts after you confirm.

    Example: qabox hosts trust oldbox
    """
    with reporting(ctx.obj["verbose"]):
        context = make_context(ctx)
        target = context.target(name)
        key = ssh.server_key(target)
        known = ssh.known_key(target)
        fingerprint = ssh.fingerprint(key)
        if known and key.get_name() in known:
            if known[key.get_name()] == key:
                out.print(f"{name} ({target.key_name}) is already trusted: {key.get_name()} {fingerprint}")
                return
            raise QaboxError(
                f"{name} ({target.key_name}) presents a DIFFERENT {key.get_name()} key than known_hosts "
                f"has ({fingerprint}): refusing; if the host was reinstalled, remove the old key with "
                f"`ssh-keygen -R '{target.key_name}' -f {ssh.known_hosts_file(target)}` first")
        out.print(f"{name} ({target.key_name}) presents {key.get_name()} key {fingerprint}")
        if not yes and not typer.confirm("Trust this key and add it to known_hosts?", default=False):
            raise QaboxError("not trusted: nothing was written")
        path = ssh.add_known_host(target, key)
        out.print(f"added to {path}")


def main() -> None:
    app(prog_name="qabox")
