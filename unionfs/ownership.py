"""How owners on disk are shown in the merged view, and back: id mappings, squashing, stored ownership.

``uidmapping=``/``gidmapping=`` take fuse-overlayfs's syntax, ``INSIDE:OUTSIDE:COUNT[:INSIDE:OUTSIDE:COUNT...]``:
ids ``OUTSIDE..OUTSIDE+COUNT-1`` on disk show as ``INSIDE..``; ids outside every range show as the overflow id
65534.  ``squash_to_root``/``squash_to_uid=N``/``squash_to_gid=N`` show every object as owned by one id.
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


class IdMapError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class IdMap:
    """Ranges (inside, outside, count)."""

    ranges: tuple[tuple[int, int, int], ...]

    def to_inside(self, outside: int) -> int:
        for inside, out, count in self.ranges:
            if out <= outside < out + count:
                return inside + (outside - out)
        return OVERFLOW_ID

    def to_outside(self, inside: int) -> int:
        for ins, out, count in self.ranges:
            if ins <= inside < ins + count:
                return out + (inside - ins)
        raise OSError(errno.EINVAL, f"id {inside} has no mapping")


def parse_idmap(text: str, what: str) -> IdMap:
    parts = text.split(":")
    if len(parts) % 3 or not text:
        raise IdMapError(f"{what} needs INSIDE:OUTSIDE:COUNT triples, not {text!r}")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise IdMapError(f"{what} needs numbers, not {text!r}") from None
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    for inside, outside, count in ranges:
        if inside < 0 or outside < 0 or count <= 0:
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
            uid = self.uidmap.to_inside(uid)
        if self.gidmap is not None:
            gid = self.gidmap.to_inside(gid)
        if self.squash_uid is not None:
            uid = self.squash_uid
        if self.squash_gid is not None:
            gid = self.squash_gid
        return uid, gid

    def to_disk(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner to store for a chown of the merged view (-1 stays -1: unchanged)."""
        if uid != -1 and self.uidmap is not None:
            uid = self.uidmap.to_outside(uid)
        if gid != -1 and self.gidmap is not None:
            gid = self.gidmap.to_outside(gid)
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
