"""``qabox join``: a tester stores the invite a developer sent them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qabox.cli.options import make_context
from qabox.cli.output import err, out, reporting


def join(ctx: typer.Context,
         invite: str = typer.Argument(..., metavar="INVITE", help="The invite file, the `qabox-invite:1:...` line, or - to read it from stdin."),
         identity: Optional[Path] = typer.Option(None, "-i", "--identity", metavar="KEYFILE", help="Your private key, when the invite was made with the public key you sent.")):
    """Join an invite: from then on `qabox tunnel` needs no options.

    The invite pins the host's key: a host that presents another is refused.

    Example: qabox join tester2.qabox-invite
    """
    with reporting(ctx):
        from qabox import joined
        from qabox.invites import PREFIX, decode

        in_argv = invite.strip().startswith(PREFIX)
        decoded = decode(invite if in_argv else read(invite))
        place, how = joined.join(make_context(ctx), decoded, identity)
        i = place.invite
        say = lambda text: out.print(text, markup=False, highlight=False)  # noqa: E731 - host names may hold [ ]
        where = f"{i.account}@{i.address}:{i.port}"
        say(f"{'already joined' if how == 'unchanged' else 'joined'} {i.tester} on {i.host} ({where}; envs "
            f"{', '.join(sorted(i.ports)) or 'none yet'}" + (f"; expires {i.expires}" if i.expires else "") + ")")
        if how == "replaced":
            say(f"  it replaces the earlier invite for {i.tester} on {i.host}")
        say(f"  open your tunnel: qabox tunnel{env_hint(sorted(i.ports))}")
        command = place.ssh_command()
        if command:
            say(f"  or, with OpenSSH's ssh alone: {command}")
        if in_argv and i.key is not None:
            err.print("note: this invite holds a private key, and a command line can be seen by other users of "
                      "this machine and stays in the shell's history: next time pass the file, or - and paste it",
                      markup=False, highlight=False)


def env_hint(envs: list[str]) -> str:
    """What ``qabox tunnel`` needs besides: nothing for main, else --env."""
    if envs and "main" not in envs:
        return f" --env {envs[0]}" + (f"  (or --env {', '.join(envs[1:])})" if envs[1:] else "")
    others = [e for e in envs if e != "main"]
    return f"  (--env {', '.join(others)} for the other envs)" if others else ""


def read(source: str) -> str:
    """The invite's text, from stdin (``-``) or a file."""
    from qabox.errors import ConfigError

    if source == "-":
        return sys.stdin.read(100_000)
    try:
        return Path(source).read_text(encoding="utf-8", errors="replace")[:100_000]
    except OSError as e:
        raise ConfigError(f"cannot read the invite file {source}: {e.strerror}; pass the file `qabox testers "
                          f"invite` wrote, or the `qabox-invite:1:...` line") from None
