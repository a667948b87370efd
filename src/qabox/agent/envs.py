"""One env's layout under the base directory, and its recorded settings.

    envs/<env>/env.json        the env's port, whether stopped, its timings
    envs/<env>/config.json     the app's configuration (see config)
    envs/<env>/deploy.lock     held by a ``session`` for a deploy's life
    envs/<env>/releases/<id>/  extracted builds, each with release.json
    envs/<env>/current         symlink to the serving release
    envs/<env>/venvs/<key>/    virtualenvs, shared by releases with equal requirements
                               (their wheels hard-linked from the host's wheelcache/, see venvs)
    envs/<env>/data/           QABOX_DATA_DIR: survives every deploy
    envs/<env>/logs/           <release>.log (app output), supervisor.log
    envs/<env>/state.json      the supervisor's view: state, pid, restarts...
    envs/<env>/ctl.sock        the supervisor's control socket
"""

import os

from .files import makedirs, read_record, write_json
from .protocol import Fail
from .rules import ENV_NAME, RELEASE_FILE, RELEASE_ID


START_TIMEOUT = 30.0


class Env:
    """Paths of one env under the base directory."""

    def __init__(self, base: str, name: str):
        if not ENV_NAME.fullmatch(name or ""):
            raise Fail("bad_env", "env name %r is not allowed: use a-z, 0-9, - and _" % name)
        self.base = os.path.abspath(os.path.expanduser(base))
        self.name = name
        self.dir = os.path.join(self.base, "envs", name)

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)

    def release_dir(self, release: str) -> str:
        return self.path("releases", release)

    def current(self) -> "str | None":
        """The current release id, from the ``current`` symlink. A deleted link
        is put back from the release the supervisor last recorded as live."""
        try:
            return os.path.basename(os.readlink(self.path("current")))
        except FileNotFoundError:
            pass
        except OSError:
            return None
        release = self.state().get("release")
        if not (release and RELEASE_ID.fullmatch(release) and os.path.isdir(self.release_dir(release))):
            return None
        try:
            link_current(self, release)
        except OSError:
            pass  # a full disk: still the release, and put back once there is room
        return release

    def releases(self) -> list:
        try:
            names = os.listdir(self.path("releases"))
        except OSError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def release_info(self, release: str, strict: bool = False) -> dict:
        return read_record(os.path.join(self.release_dir(release), RELEASE_FILE), strict)

    def settings(self, strict: bool = True) -> dict:
        """env.json: the env's port, whether it was stopped on purpose, its timings."""
        return read_record(self.path("env.json"), strict)

    def state(self) -> dict:
        """state.json, the supervisor's last record (a cache: never trusted with a pid)."""
        return read_record(self.path("state.json"), strict=False)

    def problems(self) -> list:
        """What is damaged among the env's files, each naming the file and what to do."""
        current = self.current()
        paths = [self.path("env.json"), self.path("state.json"), self.path("config.json")]
        if current:
            paths.append(os.path.join(self.release_dir(current), RELEASE_FILE))
        found = []
        for path in paths:
            try:
                read_record(path)
            except Fail as e:
                found.append(e.message)
        return found

    def ensure(self) -> None:
        for sub in ("releases", "venvs", "data", "logs"):
            makedirs(self.path(sub))
        os.chmod(self.base, 0o700)


def all_envs(base: str) -> list:
    try:
        names = os.listdir(os.path.join(os.path.expanduser(base), "envs"))
    except OSError:
        return []
    return sorted(n for n in names if ENV_NAME.fullmatch(n))


def existing_env(base: str, name: str) -> Env:
    """An env that must be on this host already; if it is not, say which are."""
    env = Env(base, name)
    if not os.path.isdir(env.dir):
        envs = all_envs(base)
        raise Fail("no_env", "there is no env %s on this host (%s)" % (
            name, "its envs: " + ", ".join(envs) if envs else "nothing is deployed there yet"))
    return env


def update_settings(env: Env, **changes) -> None:
    """Record settings in env.json (written only when something changed)."""
    settings = env.settings()
    if any(settings.get(key) != value for key, value in changes.items()):
        settings.update(changes)
        makedirs(env.dir)
        write_json(env.path("env.json"), settings)


def link_current(env: Env, release: str) -> None:
    """Point ``current`` at a release atomically (a new link renamed over it)."""
    link = env.path(".current.%d.tmp" % os.getpid())
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.join("releases", release), link)
    os.replace(link, env.path("current"))
