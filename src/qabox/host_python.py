"""The python a build's wheels are for: the host's, asked through the agent, or this machine's.

Which wheels a host installs depends on its python (version, implementation,
ABI), its platform and glibc, and the pip its virtualenvs install with (pip
18.1, python 3.6's, takes manylinux1 wheels only). ``qabox build`` resolves
for a Target, and ``qabox deploy`` checks a build's wheels against the host's
before sending anything.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import cached_property

from packaging.tags import Tag, compatible_tags, cpython_tags, generic_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import Version

from qabox.agent.venvs import cmd_python_info
from qabox.build_check import SERVER_TITLES, Build, needed_servers
from qabox.errors import BuildError

# The manylinux tags named before PEP 600 (glibc 2.5, 2.12, 2.17), the first pip that takes
# each, and the architectures each defines. PEP 600's manylinux_2_Y tags came with pip 20.3.
LEGACY = {5: ("manylinux1", "8.1", ("x86_64", "i686")),
          12: ("manylinux2010", "19.0", ("x86_64", "i686")),
          17: ("manylinux2014", "19.3", ("x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x"))}
PEP600_PIP = Version("20.3")
UV_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)  # uv's --python-platform ARCH-manylinux_2_Y


@dataclass(frozen=True)
class Target:
    """A python that installs wheels, as the agent's ``python-info`` describes it."""

    python: str  # the full version, 3.11.2 (X.Y when given by hand)
    implementation: str = "cpython"  # sys.implementation.name
    abiflags: str = ""
    soabi: str = ""
    platform: str = "linux-x86_64"  # sysconfig.get_platform(); or a wheel's platform tag given by hand
    glibc: str | None = None
    pip: str | None = None  # the version of the pip that installs the build on the host
    name: str = "this machine's python"  # for messages: "lab1's python"
    # The app servers its own packages have, for a build with no requirements.txt (None: not told).
    # Not what wheels are resolved for: left out of equality and of to_json, so a build's record
    # (and its cache key) does not change with what the host has installed.
    servers: tuple[str, ...] | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: dict, name: str) -> "Target":
        fields = {k: data.get(k) for k in cls.__dataclass_fields__ if k in data and k not in ("name", "servers")}
        servers = data.get("servers")
        return cls(**fields, name=name, servers=None if servers is None else tuple(servers))

    def to_json(self) -> dict:
        """What a build is resolved for (its RESOLVED_FOR record, its cache key)."""
        facts = asdict(self)
        del facts["servers"]
        return facts

    @property
    def version(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    @property
    def abi(self) -> str:
        """The ABI tag of its extension modules: cp311, cp36m, pypy39_pp73."""
        if self.implementation == "cpython":
            return "cp%d%d%s" % (*self.version, self.abiflags)
        return "_".join(re.split(r"[-.]", self.soabi)[:2])

    @property
    def interpreter(self) -> str:
        short = {"cpython": "cp", "pypy": "pp"}.get(self.implementation, self.implementation)
        return "%s%d%d" % (short, *self.version)

    def describe(self) -> str:
        """``lab1's python 3.11.2 (linux-x86_64, glibc 2.36, pip 23.0.1)``."""
        facts = [self.platform] + [f"{what} {value}" for what, value in (("glibc", self.glibc), ("pip", self.pip))
                                   if value]
        kind = "" if self.implementation == "cpython" else self.implementation + " "
        return f"{self.name} {kind}{self.python} ({', '.join(facts)})"

    def markers(self) -> dict[str, str]:
        """What environment markers see of it, as far as its facts tell (the rest as here)."""
        system, _, arch = self.platform.partition("-")
        seen = {"python_full_version": self.python, "python_version": "%d.%d" % self.version,
                "implementation_name": self.implementation,
                "platform_python_implementation": {"cpython": "CPython", "pypy": "PyPy"}.get(
                    self.implementation, self.implementation)}
        if self.implementation == "cpython":
            seen["implementation_version"] = self.python
        if system == "linux" and arch:
            seen.update(sys_platform="linux", platform_system="Linux", platform_machine=arch, os_name="posix")
        return seen

    def platforms(self) -> list[str]:
        """The wheel platform tags its pip installs, best first."""
        if "-" not in self.platform:
            return [self.platform]  # a wheel's platform tag, given by hand
        system, _, arch = self.platform.partition("-")
        if system != "linux":
            return [re.sub(r"[-.]", "_", self.platform)]
        found = []
        if self.glibc and self.glibc.startswith("2."):
            pip = Version(self.pip or LEGACY[5][1])
            for minor in range(int(self.glibc.split(".")[1]), 4, -1):
                if pip >= PEP600_PIP:
                    found.append(f"manylinux_2_{minor}_{arch}")
                legacy, since, arches = LEGACY.get(minor, (None, None, ()))
                if arch in arches and pip >= Version(since):
                    found.append(f"{legacy}_{arch}")
        return found + [f"linux_{arch}"]

    @cached_property
    def tags(self) -> frozenset[Tag]:
        platforms = self.platforms()
        if self.implementation == "cpython":
            own = cpython_tags(self.version, [self.abi], platforms)
        else:
            own = generic_tags(self.interpreter, [self.abi], platforms)
        return frozenset(own) | frozenset(compatible_tags(self.version, self.interpreter, platforms))

    def accepts(self, wheel: str) -> bool:
        """Whether its pip installs the wheel file named ``wheel``."""
        return not parse_wheel_filename(wheel)[3].isdisjoint(self.tags)

    def uv_platform(self) -> str:
        """uv's ``--python-platform`` for it: what environment markers see of its platform."""
        system, _, arch = self.platform.partition("-")
        glibc = int(self.glibc.split(".")[1]) if self.glibc and self.glibc.startswith("2.") else 0
        if not arch:  # a wheel's platform tag, given by hand: manylinux2014_aarch64
            system = next((s for s in ("linux", "macosx", "win") if s in self.platform), "linux")
            arch = next((a for a in ("x86_64", "aarch64") if self.platform.endswith(a)), "")
            glibc = 17 if "manylinux" in self.platform else 0
        if system == "linux" and arch:
            fitting = [y for y in UV_GLIBC if y <= glibc]
            return f"{arch}-manylinux_2_{fitting[-1]}" if fitting else f"{arch}-unknown-linux-musl"
        return {"linux": "linux", "macosx": "macos", "win": "windows"}.get(system, "linux")

    def runs_here(self) -> bool:
        """Whether it is this machine's python, which may run wheels compiled here."""
        same = ("python", "implementation", "abi", "platform", "glibc")
        return all(getattr(self, what) == getattr(here(), what) for what in same)


def here(python_version: str | None = None, platform: str | None = None) -> Target:
    """This machine's python, or one given by hand (``--python-version X.Y``, ``--platform TAG``)."""
    import importlib.metadata  # here, not at the top: every deploy's start-up pays for an import

    try:
        pip = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        pip = None  # then downloading says so
    target = Target.from_json({**cmd_python_info({}, None), "pip": pip}, "this machine's python")
    if python_version and not re.fullmatch(r"\d+\.\d+(\.\d+)?", python_version):
        raise BuildError(f"--python-version {python_version}: give the host's python as X.Y or X.Y.Z, like 3.11")
    if python_version:
        major, minor = (int(x) for x in python_version.split(".")[:2])
        target = Target(python=python_version, abiflags="m" if (major, minor) < (3, 8) else "",
                        platform=target.platform, glibc=target.glibc, pip=target.pip,
                        name="python")
    if platform:
        target = Target(**{**target.to_json(), "platform": platform, "glibc": None})
    return target


def of_host(caller, host: str) -> Target:
    """The python of a connected host (a Remote, or a Session of one): one agent request."""
    return told(caller.call("python-info"), host)


def told(info: dict, host: str) -> Target:
    """The python a host's agent described (``python-info``, or upload-state's ``python``)."""
    return Target.from_json(info, f"{host}'s python")


def check_host_servers(target: Target, build: Build, server: str, host: str) -> None:
    """A build with no requirements.txt runs on the host python's own packages: refuse
    it before it is sent when they lack its app server (else an agent traceback after upload)."""
    for needed in needed_servers(server, build.static):
        if needed not in (target.servers or ()):
            raise BuildError(f"{build.path.name} has no requirements.txt, so it runs on {host}'s python's own "
                             f"packages, which lack {SERVER_TITLES[needed]} (its app server): add a "
                             f"requirements.txt with `{needed}`, or make the build with `qabox build`, which adds it")


def check_build(build: Build, target: Target, host: str) -> None:
    """Refuse a build the host cannot install, before it is sent: a wheel its pip does not take, or a
    requirement whose marker holds on the host but not for the python the build was resolved for
    (its wheels are missing: pip would fail on the host), naming it and the fix."""
    fix = f"make the build for it with `qabox build --for {host}`"
    made_for = f" (the build was resolved for python {build.resolved_for['python']})" if build.resolved_for else ""
    for wheel in build.wheels:
        try:
            fits = target.accepts(wheel)
        except InvalidWheelFilename:
            raise BuildError(f"{build.path.name}: wheels/{wheel} is not named as a wheel is "
                             f"(name-version-python-abi-platform.whl): rename or remove it") from None
        if not fits:
            raise BuildError(f"{build.path.name}: wheels/{wheel} does not install on {target.describe()}"
                             f"{made_for}: {fix}")
    if not build.resolved_for or not build.requirements:
        return
    from packaging.requirements import InvalidRequirement, Requirement  # as above: only a build's markers need it

    made = Target.from_json(build.resolved_for, "")
    for line in build.requirements.replace("\\\n", " ").splitlines():
        try:
            marker = Requirement(re.split(r"\s(#|--?[a-z])", " " + line)[0].strip()).marker
            missing = marker and marker.evaluate(target.markers()) and not marker.evaluate(made.markers())
        except (InvalidRequirement, ValueError):
            continue  # an option, a comment, an -r line (checked before, by rules), or a marker pip cannot judge
        if missing:
            raise BuildError(f"{build.path.name}: requirements.txt: `{line.strip()}` applies on "
                             f"{target.describe()}, but not on python {made.python}, which the build's wheels "
                             f"were resolved for: {fix}")
