"""Invites joined on a tester's machine: what ``qabox tunnel`` needs without
ssh_config, known_hosts or options.

Each lives in ``STATE_DIR/invites/TESTER@HOST/`` (0700): ``invite.json``, the
private key if the invite held one (0600), and a ``known_hosts`` of its own
with just the pinned host keys, the only ones its tunnels trust.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from qabox import ssh
from qabox.context import Context
from qabox.errors import ConfigError
from qabox.agent.files import write_json, write_text
from qabox.invites import Invite, InviteError, checked


@dataclass(frozen=True)
class Joined:
    invite: Invite
    folder: Path
    identity: Path | None = None  # the tester's own key, named at join

    @property
    def key_file(self) -> Path | None:
        """The private key: the invite's own, or the one named at join (None: ~/.ssh's and ssh-agent's)."""
        return self.folder / "key" if self.invite.key is not None else self.identity

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def target(self) -> ssh.Target:
        """How the tunnel logs in: the invite's address and account, trusting its pinned keys only."""
        key = self.key_file
        return ssh.Target(alias=self.invite.host, hostname=self.invite.address, port=self.invite.port,
                          user=self.invite.account, identity_files=(str(key),) if key else (),
                          identities_only=key is not None, known_hosts=(str(self.known_hosts),),
                          pinned_by=str(self.folder))

    def ssh_command(self) -> str | None:
        """The plain OpenSSH command of this tunnel, with this machine's paths."""
        return self.invite.ssh_command(str(self.key_file or "YOUR_PRIVATE_KEY"), str(self.known_hosts))


def folder(ctx: Context, invite: Invite) -> Path:
    return ctx.state_dir / "invites" / f"{invite.tester}@{invite.host}"


def join(ctx: Context, invite: Invite, identity: Path | None = None) -> tuple[Joined, str]:
    """Store the invite: ``joined``, ``unchanged`` (the same again), or ``replaced``
    (another invite for the same tester and host, now gone)."""
    if identity is not None:
        if invite.key is not None:
            raise ConfigError("this invite holds a private key of its own: join it without -i")
        if not identity.is_file():
            raise ConfigError(f"private key {identity} does not exist: pass the key whose .pub you sent")
        identity = identity.resolve()
    record = dict(asdict(invite), identity=str(identity) if identity else None)
    place = folder(ctx, invite)
    try:
        before = json.loads((place / "invite.json").read_text())
    except (OSError, ValueError):
        before = None
    if before == json.loads(json.dumps(record)):
        return Joined(invite, place, identity), "unchanged"
    place.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(place, 0o700)
    key = place / "key"
    if invite.key is not None:
        write_text(str(key), invite.key)
    else:
        key.unlink(missing_ok=True)
    write_text(str(place / "known_hosts"), "".join(line + "\n" for line in invite.known_hosts_lines()))
    write_json(str(place / "invite.json"), record)  # last: it says done
    return Joined(invite, place, identity), "joined" if before is None else "replaced"


def joined(ctx: Context) -> list[Joined]:
    """The invites joined here (one whose record is damaged is skipped: join it again)."""
    found = []
    for record in sorted((ctx.state_dir / "invites").glob("*/invite.json")):
        try:
            data = json.loads(record.read_text())
            if not isinstance(data, dict):
                continue
            identity = data.pop("identity", None)
            found.append(Joined(checked(data), record.parent, Path(identity) if identity else None))
        except (OSError, ValueError, InviteError):
            continue
    return found


def choose(ctx: Context, user: str | None, host: str | None) -> Joined | None:
    """The joined invite a tunnel with these options uses: the one that matches
    them; None if none does; several are an error naming them."""
    matching = [j for j in joined(ctx) if user in (None, j.invite.tester) and host in (None, j.invite.host)]
    if len(matching) > 1:
        names = ", ".join(f"{j.invite.tester}@{j.invite.host}" for j in matching)
        raise ConfigError(f"several invites are joined here ({names}): say which with --user NAME and/or --host HOST")
    return matching[0] if matching else None
