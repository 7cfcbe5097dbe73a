"""How owners on disk are shown in the merged view, and back: id mappings, squashing, stored ownership.

``uidmapping=``/``gidmapping=`` take fuse-overlayfs's syntax and meaning, ``STORED:SHOWN:COUNT[:STORED:SHOWN:COUNT...]``
(a leading colon, as containers/storage writes it, is allowed): ids ``STORED..STORED+COUNT-1`` on disk show as
``SHOWN..SHOWN+COUNT-1``, and a chown to a shown id stores its stored id; ids on disk outside every range show as
the overflow id 65534, and a chown to a shown id outside every range fails with EINVAL. So
``uidmapping=0:100000:65536`` shows a file stored as uid 0 as uid 100000: the container's root, seen from the
host.  ``squash_to_root``/``squash_to_uid=N``/``squash_to_gid=N`` show every object as owned by one id.
With ``xattr_permissions`` the owner and mode a chown/chmod asks for are stored in the
``user.containers.override_stat`` xattr (``UID:GID:0MODE``) instead of on the file, for users who may not
chown: the merged view shows the stored values.
"""

from __future__ import annotations

import dataclasses
import errno
import stat

OVERFLOW_ID = 65534
OVERRIDE_XATTR = b"user.containers.override_stat"
#: where an ordinary user's store keeps an xattr it may not set as it is (``security.capability``, ``trusted.*``):
#: ``user.unionfs-xattr.NAME``; a mount with ``xattr_permissions`` shows it as NAME, never under this name
KEPT_XATTR_PREFIX = b"user.unionfs-xattr."


def kept_name(name: bytes) -> bytes:
    """The name under which the xattr ``name`` is kept by an ordinary user."""
    return KEPT_XATTR_PREFIX + name


def kept_original(disk: bytes) -> bytes | None:
    """The xattr a kept one stands for (None: ``disk`` is no kept xattr)."""
    return disk[len(KEPT_XATTR_PREFIX):] if disk.startswith(KEPT_XATTR_PREFIX) else None


class IdMapError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class IdMap:
    """Ranges (stored, shown, count): ids ``stored..stored+count-1`` on disk show as ``shown..``."""

    ranges: tuple[tuple[int, int, int], ...]

    def shown(self, stored: int) -> int:
        """The id the merged view shows for ``stored`` on disk (the overflow id when no range holds it)."""
        for first_stored, first_shown, count in self.ranges:
            if first_stored <= stored < first_stored + count:
                return first_shown + (stored - first_stored)
        return OVERFLOW_ID

    def stored(self, shown: int) -> int:
        """The id stored on disk for ``shown`` (EINVAL when no range shows it)."""
        for first_stored, first_shown, count in self.ranges:
            if first_shown <= shown < first_shown + count:
                return first_stored + (shown - first_shown)
        raise OSError(errno.EINVAL, f"id {shown} has no mapping")

    def stored_or_overflow(self, shown: int) -> int:
        try:
            return self.stored(shown)
        except OSError:
            return OVERFLOW_ID


def parse_idmap(text: str, what: str) -> IdMap:
    """``STORED:SHOWN:COUNT[:...]``, with one leading colon allowed (containers/storage writes one)."""
    body = text[1:] if text.startswith(":") else text
    parts = body.split(":")
    if len(parts) % 3 or not body:
        raise IdMapError(f"{what} needs STORED:SHOWN:COUNT triples, not {text!r}")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise IdMapError(f"{what} needs numbers, not {text!r}") from None
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    for stored, shown, count in ranges:
        if stored < 0 or shown < 0 or count <= 0:
            raise IdMapError(f"{what}: ids must be >= 0 and counts > 0 in {text!r}")
    return IdMap(ranges)


@dataclasses.dataclass(frozen=True)
class Ownership:
    """The policy for one mount; the identity policy changes nothing."""

    uidmap: IdMap | None = None
    gidmap: IdMap | None = None
    squash_uid: int | None = None
    squash_gid: int | None = None
    xattr_permissions: bool = False

    @property
    def identity(self) -> bool:
        return self == Ownership()

    def show(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner as the merged view shows it."""
        if self.uidmap is not None:
            uid = self.uidmap.shown(uid)
        if self.gidmap is not None:
            gid = self.gidmap.shown(gid)
        if self.squash_uid is not None:
            uid = self.squash_uid
        if self.squash_gid is not None:
            gid = self.squash_gid
        return uid, gid

    def creator_to_disk(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner to store for an object created by ``uid``/``gid`` of the merged view: mapped, and the overflow
        id where no range shows the creator's id (as fuse-overlayfs: a later chown can still give it an owner)."""
        if self.uidmap is not None:
            uid = self.uidmap.stored_or_overflow(uid)
        if self.gidmap is not None:
            gid = self.gidmap.stored_or_overflow(gid)
        return uid, gid

    def to_disk(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner to store for a chown of the merged view (-1 stays -1: unchanged)."""
        if uid != -1 and self.uidmap is not None:
            uid = self.uidmap.stored(uid)
        if gid != -1 and self.gidmap is not None:
            gid = self.gidmap.stored(gid)
        return uid, gid


def encode_override(uid: int, gid: int, mode: int) -> bytes:
    return b"%d:%d:0%o" % (uid, gid, stat.S_IMODE(mode))


def decode_override(value: bytes) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) from an override xattr, or None when malformed."""
    try:
        uid, gid, mode = value.split(b":")[:3]
        return int(uid), int(gid), int(mode, 8) & 0o7777
    except ValueError:
        return None
