"""``qabox testers add``, ``invite``, ``remove``, ``list`` and ``extend``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from qabox.cli.join import env_hint
from qabox.cli.options import HOST, make_context
from qabox.cli.output import out, print_json, print_table, reporting

app = typer.Typer(help="Testers: keys that reach the app through a tunnel and nothing else.", no_args_is_help=True)
EXPIRES_HELP = "A duration (30m, 12h, 7d, 2w) or a UTC date/time (2026-12-09T12:00); sshd refuses the key after it."


def expiry(text: str | None) -> datetime | None:
    from qabox.expiry import parse_expiry

    return None if text is None else parse_expiry(text, datetime.now(timezone.utc))


def scope_text(tester: dict) -> str:
    """``all envs`` or the env names, then the expiry: what a person reads."""
    envs = ", ".join(tester["envs"]) if tester.get("envs") is not None else "all envs"
    if not tester.get("expires"):
        return envs
    return f"{envs}; {'expired' if tester.get('expired') else 'expires'} {tester['expires']}"


@app.command("add")
def testers_add(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name (a-z, 0-9, -, _)."),
                key: Path = typer.Option(..., "--key", metavar="FILE", help="The tester's public key file (.pub)."),
                host: str = HOST,
                envs: Optional[List[str]] = typer.Option(None, "--env", metavar="ENV", help="Only this env (repeatable); default: every env, also those deployed later."),
                expires: Optional[str] = typer.Option(None, "--expires", metavar="WHEN", help=EXPIRES_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Let a tester's key reach the app's ports on a host, and nothing else.

    Adding a tester again sets their key, envs and expiry anew.

    Example: qabox testers add tester2 --key tester2.pub --host oldbox --env main --expires 7d
    """
    with reporting(ctx, as_json):
        from qabox.commands.testers import tester_add

        result = tester_add(make_context(ctx), host, name, key, envs=envs or None, expires=expiry(expires))
        if as_json:
            print_json(ctx, result)
            return
        ports = ", ".join(f"{e}: {p}" for e, p in sorted(result["ports"].items())) or "no envs yet"
        verb = "added" if result["changed"] else "already has this key"
        out.print(f"tester {name} {verb} on {host} ({result['fingerprint']}; ports {ports}; {scope_text(result)})")
        out.print(f"  they connect with: qabox tunnel --user {name} --host {host} -i THEIR_KEY")


@app.command("invite")
def testers_invite(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name (a-z, 0-9, -, _)."),
                   host: str = HOST,
                   envs: Optional[List[str]] = typer.Option(None, "--env", metavar="ENV", help="Only this env (repeatable); default: every env, also those deployed later."),
                   expires: Optional[str] = typer.Option(None, "--expires", metavar="WHEN", help=EXPIRES_HELP),
                   key: Optional[Path] = typer.Option(None, "--key", metavar="FILE", help="The tester's public key file (.pub); default: make a key for them, sent in the invite."),
                   address: Optional[str] = typer.Option(None, "--address", metavar="HOST[:PORT]", help="Where testers reach the host, when you reach it otherwise (through a jump host, say)."),
                   output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="FILE", help="Where to write the invite (default: NAME.qabox-invite here).")):
    """Add a tester and write their invite: all their side needs, in one line.

    The tester runs `qabox join INVITE`, then `qabox tunnel`: no ssh_config,
    no host key to trust on first use (the invite pins the host's key), no
    options. Without --key the invite holds a private key made for them: it is
    a secret, written 0600, to send privately.

    Example: qabox testers invite tester2 --host oldbox --env main --expires 7d
    """
    with reporting(ctx):
        from qabox.commands.testers import tester_invite

        path = output or Path(f"{name}.qabox-invite")
        result, invite = tester_invite(make_context(ctx), host, name, key, path, envs=envs or None,
                                       expires=expiry(expires), address=address)
        secret = invite.key is not None
        line = invite.encode()
        say = lambda text: out.print(text, markup=False, highlight=False)  # noqa: E731 - host names may hold [ ]
        ports = ", ".join(f"{e}: {p}" for e, p in sorted(result["ports"].items())) or "no envs yet"
        say(f"tester {name} {'added' if result['changed'] else 'already has this key'} on {host} "
            f"({result['fingerprint']}; ports {ports}; {scope_text(result)})")
        say(f"invite written to {path}" + (" (0600)" if secret else ""))
        if secret:
            say(f"  SECRET: it holds a private key made for {name}: send it privately (a direct message, not a "
                f"shared channel); whoever has it reaches {name}'s ports until `qabox testers remove {name} "
                f"--host {host}`")
        say(line)
        say(f"  {name} runs: qabox join {path.name}   (or `qabox join -` and pastes the line above)")
        say(f"        then: qabox tunnel{env_hint(sorted(invite.ports))}")
        command = invite.ssh_command("KEY" if secret else "THEIR_PRIVATE_KEY", f"{host}.known_hosts")
        if command:
            say(f"  without qabox (the ssh of Windows 10+, macOS, Linux): put this line in a file {host}.known_hosts")
            for known in invite.known_hosts_lines():
                say(f"    {known}")
            say("  then run (" + ("KEY: the private key in the invite; `qabox join` prints this with its file"
                                  if secret else "THEIR_PRIVATE_KEY: the private half of the key they sent") + ")")
            say(f"    {command}")
            say(f"  and open {'; '.join(invite.local_urls())}")


@app.command("remove")
def testers_remove(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name."), host: str = HOST):
    """Take a tester's key off a host.

    Example: qabox testers remove tester2 --host oldbox
    """
    with reporting(ctx):
        from qabox.commands.testers import tester_remove

        ended = tester_remove(make_context(ctx), host, name).get("disconnected", 0)
        out.print(f"tester {name} removed from {host}" + (f" (their {ended} open tunnel(s) ended)" if ended else ""))


@app.command("list")
def testers_list(ctx: typer.Context, host: str = HOST,
                 as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List a host's testers: key fingerprints, their ports per env, scope and expiry, who is connected.

    Example: qabox testers list --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.testers import tester_list

        data = tester_list(make_context(ctx), host)
        if as_json:
            print_json(ctx, data)
            return
        print_table(("TESTER", "FINGERPRINT", "ENVS (PORT)", "ACCESS", "CONNECTED"), [
            (t["name"], t["fingerprint"], ", ".join(f"{e} ({p})" for e, p in sorted(t["ports"].items())) or "-",
             scope_text(t),
             ", ".join(f"from {c['from']} since {c['since']}" for c in t["connected"]) or "-")
            for t in data["testers"]], key=("TESTER", "ENVS (PORT)"))


@app.command("extend")
def testers_extend(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name."),
                   expires: str = typer.Option(..., "--expires", metavar="WHEN", help=EXPIRES_HELP + " 'never' lifts it."),
                   host: str = HOST):
    """Change only a tester's expiry (one already expired gets their access back).

    Example: qabox testers extend tester2 --expires 3d --host oldbox
    """
    with reporting(ctx):
        from qabox.commands.testers import tester_extend

        result = tester_extend(make_context(ctx), host, name, expiry(expires))
        out.print(f"tester {name} on {host}: " + (f"expires {result['expires']}" if result["expires"] else "never expires"))
