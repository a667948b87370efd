"""``--expires`` (a duration such as ``30m``, ``12h``, ``7d``, ``2w``, or a UTC
date/time) and ``--since`` (a duration)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from qabox.errors import ConfigError

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
DURATION = re.compile(r"(\d{1,6})([smhdw])")


def parse_expiry(text: str, now: datetime) -> datetime | None:
    """The moment ``text`` names, as an aware UTC datetime (None for ``never``).

    A duration counts from ``now``; a date or time without a zone is UTC (a
    date alone means its midnight). A moment not after ``now`` is refused.
    """
    text = text.strip()
    if text == "never":
        return None
    found = DURATION.fullmatch(text)
    if found:
        when = now + length(found)
    else:
        try:
            when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise ConfigError(f"--expires {text!r} is neither a duration (30m, 12h, 7d, 2w) nor a UTC "
                              f"date/time (2026-12-09 or 2026-12-09T12:00)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    when = when.astimezone(timezone.utc).replace(microsecond=0)
    if when <= now:
        raise ConfigError(f"--expires {text} is in the past ({when:%Y-%m-%dT%H:%M:%SZ}): give a later time")
    return when


def length(found: re.Match) -> timedelta:
    """The time a DURATION match names."""
    return timedelta(**{UNITS[found.group(2)]: int(found.group(1))})


def iso_utc(when: datetime | None) -> str | None:
    """The form the agent takes: ``2026-12-09T12:00:00Z``."""
    return None if when is None else when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration(text: str, option: str) -> int:
    """A duration such as ``--since 1h`` takes (30m, 12h, 7d, 2w), in seconds."""
    found = DURATION.fullmatch(text.strip())
    if not found:
        raise ConfigError(f"{option} {text!r} is not a duration: give one such as 30m, 12h, 7d or 2w")
    return int(length(found).total_seconds())
