"""One error family: caught once, at the CLI's edge, and shown as one line."""

from __future__ import annotations

# Exit codes, so that scripts can tell failures apart.
USAGE = 2
CONNECT = 3
HOST_KEY = 4
BAD_INPUT = 5
REMOTE = 6
LOCKED = 7


class QaboxError(Exception):
    """A failure the user can act on: what happened, and what to do."""

    exit_code = 1

    def __init__(self, message: str, *, log: list[str] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.log = log or []
        self.code = code


class ConfigError(QaboxError):
    """A hosts file, ssh_config or option is wrong."""

    exit_code = USAGE


class ConnectError(QaboxError):
    """The host cannot be reached or refuses the login."""

    exit_code = CONNECT


class HostKeyError(QaboxError):
    """The host's key is unknown or has changed: nothing was sent."""

    exit_code = HOST_KEY


class BuildError(QaboxError):
    """The build file cannot be deployed as it is."""

    exit_code = BAD_INPUT


class RemoteError(QaboxError):
    """The host-side agent reported a failure."""

    exit_code = REMOTE


class LockHeld(RemoteError):
    """Another deploy holds the env's lock."""

    exit_code = LOCKED
