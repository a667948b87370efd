"""Builds on the host: a content-addressed store of blobs (each file's content,
named by its sha256), the manifests naming them, and releases assembled from
them safely.

    blobs/<sha256>              a file's content, written only here (tmp, then rename)
    manifests/<id>.json         a build's manifest (see manifest), its id its sha256
    uploads/<env>.<what>.part   what SFTP writes for this module to take in
    uploads/<env>.delta-<id>.json  the blobs a delta carries, in order
    verified.json               blobs found sound, by their files' signatures

Nothing is trusted before it is checked: a manifest against its id, a delta's
pieces and every blob (again, as it is copied, unless it was found sound
before and not written since) against their hashes.
"""

import errno
import hashlib
import json
import os
import stat
import time

from .envs import Env, all_envs
from .files import copy_file, digest, is_int, makedirs, read_json, remove, write_json
from .manifest import MAX_BYTES, delta_id, parse, wanted
from .protocol import Fail
from .rules import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, SHA256, check_members, name_parts, shown

MISMATCH = "the uploaded files do not match the build's manifest: deploy again"
GRACE = 3600  # seconds a new manifest or blob is kept unreferenced: another env's deploy may be using it
COPY = 1 << 20
VERIFIED = "verified.json"  # blobs found sound, by their files' signatures (see Store.verified)
MAX_VERIFIED = 50000


class Store:
    """The base directory's blobs, manifests and an env's uploads."""

    def __init__(self, base: str, env: str = None):
        self.base = os.path.abspath(os.path.expanduser(base))
        self.env = env
        self._verified = None
        self.checked = {}  # sha -> signature, of the blobs this process found sound
        for sub in ("blobs", "manifests", "uploads"):
            path = makedirs(os.path.join(self.base, sub))
            if os.path.islink(path):
                raise Fail("unsafe", "%s is a symlink: qabox does not write through it; remove it" % path)

    def blob(self, sha: str) -> str:
        return os.path.join(self.base, "blobs", sha)

    def has(self, sha: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.blob(sha)).st_mode)
        except FileNotFoundError:
            return False

    def manifest_path(self, mid: str) -> str:
        return os.path.join(self.base, "manifests", mid + ".json")

    def upload(self, what: str) -> str:
        """Where SFTP writes ``what`` (``manifest-ID``, ``delta-ID``) for the env; a link planted there is removed."""
        path = os.path.join(self.base, "uploads", "%s.%s.part" % (self.env, what))
        if os.path.islink(path):
            os.unlink(path)
        return path

    def discard(self, keep: str = None) -> None:
        """The env's uploads but ``keep`` (one for another build or delta is stale)."""
        folder = os.path.join(self.base, "uploads")
        for name in os.listdir(folder):
            if name.startswith(self.env + ".") and name.split(".")[1] != keep:
                remove(os.path.join(folder, name))

    def members(self, mid: str, max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS,
                uploaded: bool = False) -> list:
        """A build's checked members, from its stored manifest, or (``uploaded``)
        from the one just sent, which is stored only once it passes."""
        if not SHA256.fullmatch(mid or ""):
            raise Fail("bad_request", "not a sha256: %r" % (mid,))
        path = self.manifest_path(mid)
        source = self.upload("manifest-" + mid) if uploaded else path
        try:
            with open(source, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            raise Fail("no_build", "the host does not have this build's manifest: deploy again")
        try:
            members = parse(raw, mid, max_members)
        except Fail:
            if uploaded:
                os.unlink(source)
            raise
        problems = check_members(members, max_bytes, max_members)
        if problems:
            if uploaded:
                os.unlink(source)
            more = "; and %d more" % (len(problems) - 10) if len(problems) > 10 else ""
            raise Fail("bad_build", "the build has unsafe members: %s%s: rebuild it without them"
                       % ("; ".join(problems[:10]), more))
        if uploaded:
            os.replace(source, path)
        else:
            os.utime(path)  # in use: not garbage for another GRACE
        return members

    def delta(self, members: list) -> dict:
        """The delta the host needs for a build: the blobs it lacks, in order, and
        what of it was sent already (a part for another delta is discarded).
        Its list is kept beside the part: another env may take in some of its
        blobs before this deploy does."""
        hashes = wanted(members, self.has)
        did = delta_id(hashes)
        self.discard(keep="delta-" + did)
        part = self.upload("delta-" + did)
        if hashes:
            write_json(part[:-len(".part")] + ".json", hashes)
        sizes = {m.sha256: m.size for m in members if m.isfile()}
        return {"delta": did, "hashes": hashes, "blobs": len(hashes), "size": sum(sizes[h] for h in hashes),
                "part_path": part, "part": os.path.getsize(part) if os.path.isfile(part) else 0}

    def take_delta(self, members: list) -> None:
        """Split the env's uploaded delta into blobs, verifying each; then the
        build's blobs must all be here.

        From its end: each blob copied out is cut off the part, and the first
        becomes a blob by renaming, so taking a delta in needs no more room
        than its largest blob (a delta of one file, none). Killed midway, the
        blobs taken in stay, each whole under its name, and the rest is sent again."""
        sizes = {m.sha256: m.size for m in members if m.isfile()}
        hashes = self.delta_list(sizes)
        if hashes:
            starts = [0]
            for sha in hashes:
                starts.append(starts[-1] + sizes[sha])
            part = self.upload("delta-" + delta_id(hashes))
            if not os.path.isfile(part) or os.path.getsize(part) < starts[-1]:
                raise Fail("no_build", "the upload is incomplete: deploy again to resume it")
            with open(part, "r+b") as f:
                f.truncate(starts[-1])
                for sha, start in reversed(list(zip(hashes, starts))):
                    f.seek(start)
                    if self.has(sha):  # taken in meanwhile, for another env
                        f.truncate(start)
                    elif start:
                        self.put(f, sha, sizes[sha], part)
                        f.truncate(start)
                    elif digest(f) == (sha, sizes[sha]):
                        os.chmod(part, 0o600)
                        os.replace(part, self.blob(sha))
                        self.checked[sha] = signature(os.stat(self.blob(sha)))
                    else:
                        os.unlink(part)
                        raise Fail("checksum", MISMATCH)
        self.discard()
        missing = wanted(members, self.has)
        if missing:
            raise Fail("no_build", "the host lacks %d of the build's files (pruned meanwhile?): deploy again "
                       "to send them" % len(missing))

    def delta_list(self, sizes: dict) -> list:
        """The hashes of the env's delta for this build (as upload-state named
        them), or none; a list naming content the build has not is refused."""
        folder = os.path.join(self.base, "uploads")
        for name in os.listdir(folder):
            if name.startswith(self.env + ".delta-") and name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    hashes = json.load(f)
                if not all(sha in sizes for sha in hashes):
                    raise Fail("no_build", "the upload is for another build: deploy again")
                return hashes
        return []

    def put(self, source, sha: str, size: int, part: str) -> None:
        """One blob from ``size`` bytes of ``source``: under its name only if they hash to it."""
        tmp = "%s.%d.tmp" % (self.blob(sha), os.getpid())
        h = hashlib.sha256()
        try:
            with open(tmp, "xb") as out:
                left = size
                while left:
                    block = source.read(min(COPY, left))
                    if not block:
                        raise Fail("no_build", "the upload is incomplete: deploy again to resume it")
                    h.update(block)
                    out.write(block)
                    left -= len(block)
            if h.hexdigest() != sha:
                os.unlink(part)
                raise Fail("checksum", MISMATCH)
            os.replace(tmp, self.blob(sha))
            self.checked[sha] = signature(os.stat(self.blob(sha)))
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def copy_blob(self, member, out) -> None:
        """A file member's content from its blob into ``out``, verified as it goes
        (its hash, and its size, which the member limits count): a damaged blob
        is removed, never served. A blob verified before and not written since
        (``verified``) is copied by the kernel, unhashed."""
        sha = member.sha256
        try:
            source = open(self.blob(sha), "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise Fail("no_build", "a file of the build is missing on the host (%s): deploy again to send it"
                       % sha[:12])
        with source:
            seen = signature(os.fstat(source.fileno()))
            if seen[1] == member.size and seen in (self.checked.get(sha), self.verified.get(sha)):
                out.flush()
                copy_file(source.fileno(), out.fileno(), member.size)
                self.checked[sha] = seen
                return
            found, size = digest(source, out)
        if found == sha and size != member.size:
            raise Fail("bad_build", "%s: the manifest says %d bytes, its content has %d: deploy it with this qabox"
                       % (shown(member.name), member.size, size))
        if found != sha:
            os.unlink(self.blob(sha))
            raise Fail("checksum", "a stored file of the build (%s) was damaged on the host and was removed: "
                       "deploy again to send it anew" % sha[:12])
        self.checked[sha] = seen

    @property
    def verified(self) -> dict:
        """The blobs found sound before, each with its file's signature then
        (see signature): any write to a blob since changes it."""
        if self._verified is None:
            found = read_json(os.path.join(self.base, VERIFIED), {})
            self._verified = {sha: tuple(sig) for sha, sig in found.items()
                              if SHA256.fullmatch(sha) and isinstance(sig, list) and len(sig) == 4
                              and all(is_int(n) for n in sig)} if isinstance(found, dict) else {}
        return self._verified

    def remember_checked(self) -> None:
        """Record the blobs this deploy found sound, for the next one (only those,
        if the record grows past MAX_VERIFIED)."""
        if not self.checked:
            return
        merged = dict(self.verified, **self.checked)
        write_json(os.path.join(self.base, VERIFIED), merged if len(merged) <= MAX_VERIFIED else self.checked)

    def gc(self, grace: float = GRACE) -> None:
        """Delete the manifests and blobs no kept release of any env uses, but
        those newer than ``grace`` seconds."""
        used, keep = set(), set()
        for name in all_envs(self.base):
            env = Env(self.base, name)
            used.update(env.release_info(r).get("sha256") for r in env.releases())
        old = time.time() - grace
        folder = os.path.join(self.base, "manifests")
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            mid = name[:-len(".json")]
            if mid in used or os.path.getmtime(path) > old:
                try:
                    with open(path, "rb") as f:
                        keep.update(item[5] for item in json.loads(f.read().decode())["members"])
                except (OSError, ValueError, KeyError, TypeError, IndexError):
                    pass  # damaged: its blobs are garbage, and so is it (never trusted: parse checks its hash)
                else:
                    continue
            os.unlink(path)
        folder = os.path.join(self.base, "blobs")
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name not in keep and os.path.getmtime(path) <= old:
                os.unlink(path)


def signature(st) -> tuple:
    """What any write to a file changes: its inode, size, mtime and ctime (the
    last not even settable by its owner)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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


def write_member(member, root: int, copy) -> None:
    """Write one member under the directory ``root``, following no link;
    ``copy(member, out)`` writes a file's content.

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
                copy(member, out)
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


def assemble(store: Store, members: list, dest: str) -> None:
    """Make a checked build's release directory from the store's blobs, never outside it.

    Not tarfile.extractall, nor a tar at all: each member is written by
    write_member, which follows no link, from a blob verified as it is copied
    (or found sound by an earlier deploy and not written since).
    """
    os.mkdir(dest, 0o700)
    root = os.open(dest, OPEN_DIR)
    try:
        for member in members:
            try:
                write_member(member, root, store.copy_blob)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise Fail("bad_build", "%s could not be extracted: %s: change or remove it in the"
                           " build and deploy again" % (shown(member.name), e.strerror or e))
    finally:
        os.close(root)
    try:
        store.remember_checked()
    except OSError:
        pass  # a full disk: the next deploy hashes them again
