"""A build as a manifest (its tar's members, in order, each file named by the
sha256 of its content) and its content as blobs: what qabox sends, and what the
host assembles a release from.

qabox makes the manifest in its one read of the tarball; the host parses it
back into TarInfo members for the very rules (``rules.check_members``) the
tarball met. Both sides use this module, so they cannot disagree on a build's
identity: the sha256 of the manifest's canonical JSON.
"""

import hashlib
import json
import tarfile

from .protocol import Fail
from .rules import SHA256

VERSION = 1
MAX_BYTES = 64 * 2**20  # a manifest of 50,000 members with long names fits easily
FIELDS = ("name", "type", "mode", "mtime", "size", "sha256", "linkname")


class Member(tarfile.TarInfo):
    """A member read back from a manifest: a TarInfo and its content's sha256."""

    __slots__ = ("sha256",)


def canonical(data) -> bytes:
    """The one byte form of a JSON value that both sides hash."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry(member: tarfile.TarInfo, sha: str) -> list:
    """A member as the manifest records it (content as its sha256, files only)."""
    isfile = member.isfile()
    return [member.name, member.type.decode("latin-1"), member.mode, member.mtime,
            member.size if isfile else 0, sha if isfile else "", member.linkname]


def scan(tar: tarfile.TarFile, max_members: int, keep=None):
    """A tar's members (at most one past ``max_members``: a small tar.gz can
    hold millions of empty members) and its manifest, in one streaming pass; ``keep(member, data)`` is given each
    small file's content (at most 1 MB), for a caller that reads some of them."""
    members, entries = [], []
    for member in tar:
        members.append(member)
        sha = ""
        if member.isfile():
            h = hashlib.sha256()
            source = tar.extractfile(member)
            small = [] if keep is not None and member.size <= 2**20 else None
            for block in iter(lambda: source.read(1 << 20), b""):
                h.update(block)
                if small is not None:
                    small.append(block)
            sha = h.hexdigest()
            if small is not None:
                keep(member, b"".join(small))
        entries.append(entry(member, sha))
        if len(members) > max_members:
            break
    return members, {"version": VERSION, "members": entries}


def identity(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def parse(raw: bytes, expected: str, max_members: int) -> list:
    """The members of an uploaded manifest as Members (one past ``max_members``
    at most, for check_members to refuse), refused unless it is the canonical
    form hashing to ``expected``."""
    if len(raw) > MAX_BYTES:
        raise Fail("bad_build", "the build's manifest is larger than %d MB: ship fewer files"
                   % (MAX_BYTES // 2**20))
    if hashlib.sha256(raw).hexdigest() != expected:
        raise Fail("checksum", "the uploaded manifest does not match its sha256: deploy again")
    try:
        data = json.loads(raw.decode("ascii"))
        if not isinstance(data, dict) or data.get("version") != VERSION or canonical(data) != raw:
            raise ValueError("not a version %d manifest in canonical form" % VERSION)
        return [member_of(item) for item in data["members"][:max_members + 1]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Fail("bad_build", "the build's manifest is malformed (%s): deploy it with this qabox" % e)


def member_of(item) -> tarfile.TarInfo:
    """One manifest entry back as the TarInfo it came from; ValueError if malformed."""
    if not isinstance(item, list) or len(item) != len(FIELDS):
        raise ValueError("an entry is not [%s]" % ", ".join(FIELDS))
    name, kind, mode, mtime, size, sha, linkname = item
    if not (isinstance(name, str) and isinstance(kind, str) and len(kind) == 1 and isinstance(linkname, str)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (mode, size))
            and isinstance(mtime, (int, float)) and not isinstance(mtime, bool)):
        raise ValueError("entry %.100r has a field of the wrong type" % (name,))
    member = Member(name)
    member.type, member.mode, member.mtime = kind.encode("latin-1"), mode, mtime
    member.size, member.linkname = size if member.isfile() else 0, linkname
    if member.isfile() and not SHA256.fullmatch(sha or ""):
        raise ValueError("file %.100r has no content sha256" % name)
    member.sha256 = sha if member.isfile() else ""
    return member


def wanted(members: list, have) -> list:
    """The content hashes of manifest ``members`` for which ``have(sha)`` is false, each
    once, in manifest order: the order of the blobs in a delta, on both sides."""
    seen, out = set(), []
    for member in members:
        sha = member.sha256
        if sha and sha not in seen:
            seen.add(sha)
            if not have(sha):
                out.append(sha)
    return out


def delta_id(hashes: list) -> str:
    """A delta's name: the sha256 of the hashes it carries, in order."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def delta_blocks(tar: tarfile.TarFile, manifest: dict, hashes: list, offset: int = 0):
    """The bytes of a delta after its first ``offset``: the content of each of
    ``hashes`` in turn, read from the build's tar (a stream, in one pass)."""
    todo = iter(hashes)
    sha, at = next(todo, None), 0
    for member, item in zip(tar, manifest["members"]):
        if sha is None:
            return
        if item[5] != sha:
            continue
        end = at + item[4]
        if end > offset:
            source = tar.extractfile(member)
            skip = max(0, offset - at)
            while skip > 0:
                skip -= len(source.read(min(skip, 1 << 20)) or b"?")
            for block in iter(lambda: source.read(1 << 20), b""):
                yield block
        sha, at = next(todo, None), end
    if sha is not None:
        raise ValueError("the build no longer holds the content %s" % sha[:12])
