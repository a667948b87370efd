"""Uploaded builds: what the host has of one, verifying it, extracting it safely."""

import errno
import os
import shutil
import stat
import tarfile

from .envs import Env, all_envs
from .files import file_sha256, makedirs
from .protocol import Fail
from .rules import DEFAULT_MAX_MEMBERS, SHA256, check_members, name_parts, read_members, shown


def cmd_upload_state(req, io) -> dict:
    """What the host has of a build: all of it, part of it (resume), or none."""
    sha = req["sha256"]
    if not SHA256.fullmatch(sha):
        raise Fail("bad_request", "not a sha256: %r" % sha)
    builds = makedirs(os.path.join(os.path.abspath(os.path.expanduser(req["base"])), "builds"))
    if os.path.islink(builds):
        raise Fail("unsafe", "%s is a symlink: qabox does not write through it; remove it" % builds)
    final = os.path.join(builds, sha)
    part = final + ".part"
    for path in (final, part):
        if os.path.islink(path):  # planted: the upload must never write through it
            os.unlink(path)
    if req.get("discard"):  # the client gave up on a partial upload (disk full)
        if os.path.isfile(part):
            os.unlink(part)
        return {"discarded": True, "free_bytes": shutil.disk_usage(builds).free}
    env = Env(req["base"], req["env"])
    current = env.current()
    info = env.release_info(current) if current else {}
    return {
        "have": os.path.isfile(final),
        "part": os.path.getsize(part) if os.path.isfile(part) else 0,
        "part_path": part,
        "current": current,
        "current_sha256": info.get("sha256"),
        "free_bytes": shutil.disk_usage(builds).free,
    }


def take_build(builds: str, sha: str) -> str:
    """The verified build file: a finished upload is checked before first use."""
    final = os.path.join(builds, sha)
    if os.path.isfile(final) and not os.path.islink(final):
        return final
    part = final + ".part"
    if not os.path.isfile(part):
        raise Fail("no_build", "the build was not uploaded: deploy again")
    if file_sha256(part) != sha:
        os.unlink(part)
        raise Fail("checksum", "the uploaded build does not match its sha256: deploy again")
    os.replace(part, final)
    return final


OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: int, parts: list) -> int:
    """A descriptor of directory ``root/parts``, made one level at a time if
    missing, never through a link (``O_NOFOLLOW`` at every level)."""
    fd = os.dup(root)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int) -> None:
    """Write one member under the directory ``root``, following no link.

    Safe even for a member check_members would refuse: it fails instead of
    writing outside. Modes are the deploy account's only: directories 0700,
    files 0600, or 0700 when the build has them executable.
    """
    parts = name_parts(member.name)
    if ".." in parts:
        raise OSError(errno.EINVAL, "'..' in its path")
    if not parts:
        return  # the build's root: the release directory itself
    parent = open_dir(root, parts[:-1])
    name = parts[-1]
    try:
        if member.isdir():
            os.close(open_dir(parent, [name]))
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            source = name_parts(member.linkname)
            if not source or ".." in source:
                raise OSError(errno.EINVAL, "a hardlink to '..' or to no name")
            where = open_dir(root, source[:-1])
            try:
                if not stat.S_ISREG(os.stat(source[-1], dir_fd=where, follow_symlinks=False).st_mode):
                    raise OSError(errno.EINVAL, "a hardlink to something that is not a file")
                os.link(source[-1], name, src_dir_fd=where, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(where)
        elif member.isfile():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent), "wb") as out:
                shutil.copyfileobj(tar.extractfile(member), out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), member.mode & 0o700 | 0o600)
                try:  # the build's mtimes, as tar keeps them: static files' Last-Modified survives a deploy
                    os.utime(out.fileno(), (member.mtime, member.mtime))
                except (OSError, OverflowError, ValueError):
                    pass
        else:
            raise OSError(errno.EINVAL, "not a file, directory or link")
    finally:
        os.close(parent)


def extract(build: str, dest: str, max_bytes: int, max_members: int = DEFAULT_MAX_MEMBERS) -> None:
    """Extract a checked build into a new directory, never outside it.

    Not tarfile.extractall: pythons before 3.11.4 (Debian 12 has 3.11.2) have
    no extraction filter, and extractall writes through links a build made.
    """
    try:
        tar = tarfile.open(build)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise Fail("bad_build", "the build is not a readable tar file: %s" % e)
    with tar:
        try:
            members = read_members(tar, max_members)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise Fail("bad_build", "the build is truncated or corrupt: %s" % e)
        problems = check_members(members, max_bytes, max_members)
        if problems:
            more = "; and %d more" % (len(problems) - 10) if len(problems) > 10 else ""
            raise Fail("bad_build", "the build has unsafe members: %s%s: rebuild it without them"
                       % ("; ".join(problems[:10]), more))
        os.mkdir(dest, 0o700)
        root = os.open(dest, OPEN_DIR)
        try:
            for member in members:
                try:
                    extract_member(tar, member, root)
                except (tarfile.TarError, EOFError) as e:
                    raise Fail("bad_build", "the build is truncated or corrupt at %s (%s): make it again"
                               % (shown(member.name), e))
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise Fail("bad_build", "%s could not be extracted: %s: change or remove it in the"
                               " build and deploy again" % (shown(member.name), e.strerror or e))
        finally:
            os.close(root)


def drop_build(base: str, sha: str) -> None:
    """Delete an uploaded build that no kept release of any env uses."""
    for name in all_envs(base):
        other = Env(base, name)
        if any(other.release_info(r).get("sha256") == sha for r in other.releases()):
            return
    path = os.path.join(os.path.abspath(os.path.expanduser(base)), "builds", sha)
    if os.path.isfile(path):
        os.unlink(path)
