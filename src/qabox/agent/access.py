"""A tester's scope (the envs they reach) and expiry: the pure rules.

Scope: ``envs`` is a list of env names, or None for every env, including envs
deployed later. Expiry: ``expires`` is an ISO-8601 UTC time, or None for never;
sshd itself refuses the key after it (the ``expiry-time`` key option), and the
agent stops serving the tester's ports and ends their tester sessions.
"""

import calendar
import re
import time

from .protocol import Fail
from .rules import ENV_NAME

ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"
EXPIRY_TIME = re.compile(r"\d{14}Z?")  # what authorized_line writes, checked again there


def check_envs(envs, existing) -> "list | None":
    """The tester's scope, sorted, or None (all envs). Each name must be an env
    of this host: a typo would otherwise give a tester nothing, silently."""
    if envs is None:
        return None
    if not isinstance(envs, list) or not envs:
        raise Fail("bad_request", "envs must be a list of env names, or null for every env")
    for env in envs:
        if not isinstance(env, str) or not ENV_NAME.fullmatch(env):
            raise Fail("bad_env", "env name %r is not allowed: use up to 32 of a-z, 0-9, - and _" % (env,))
    unknown = sorted(set(envs) - set(existing))
    if unknown:
        raise Fail("no_env", "there is no env %s on this host (it has: %s): deploy it first, or "
                   "check the name" % (", ".join(unknown), ", ".join(sorted(existing)) or "none"))
    return sorted(set(envs))


def parse_expires(text, at: float) -> "float | None":
    """The expiry as a UNIX time, or None (never). One in the past is refused."""
    if text is None:
        return None
    try:
        when = calendar.timegm(time.strptime(text, ISO_UTC))
    except (TypeError, ValueError):
        raise Fail("bad_request", "expires must be a UTC time like 2026-12-09T12:00:00Z, or null") from None
    if when <= at:
        raise Fail("expired", "%s is in the past (the host's clock says %s): give a later expiry"
                   % (text, time.strftime(ISO_UTC, time.gmtime(at))))
    return when


def expiry_time(when: float, sshd: str) -> str:
    """The ``expiry-time`` option's value for this sshd.

    The ``Z`` (UTC) suffix came in OpenSSH 8.7; an older sshd rejects a line
    with it, and reads the time in the system time zone, which the agent
    shares (sshd hands its TZ to sessions), so it gets local time instead.
    ``expiry-time`` itself came in 7.7, below the 7.8 that tester keys need
    anyway (``check_sshd``).
    """
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", sshd or "")
    if found and (int(found.group(1)), int(found.group(2))) >= (8, 7):
        return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(when))
    return time.strftime("%Y%m%d%H%M%S", time.localtime(when))


def well_formed(tester) -> bool:
    """Whether a stored tester record can be used: a key, and a scope and
    expiry as qabox writes them (a hand-edited store must not fail later,
    midway through rewriting authorized_keys)."""
    if not (isinstance(tester, dict) and isinstance(tester.get("key"), str)):
        return False
    envs, stamp = tester.get("envs"), tester.get("expiry_time")
    if envs is not None and not (isinstance(envs, list) and all(isinstance(e, str) for e in envs)):
        return False
    if stamp is not None and not (isinstance(stamp, str) and EXPIRY_TIME.fullmatch(stamp)):
        return False
    try:
        expires_at(tester)
    except (TypeError, ValueError):
        return False
    return True


def expires_at(tester: dict) -> "float | None":
    text = tester.get("expires")
    return calendar.timegm(time.strptime(text, ISO_UTC)) if text else None


def expired(tester: dict, at: float) -> bool:
    when = expires_at(tester)
    return when is not None and when <= at


def in_scope(tester: dict, envs) -> set:
    """The envs of this host the tester reaches."""
    scope = tester.get("envs")
    return set(envs) if scope is None else set(envs) & set(scope)
