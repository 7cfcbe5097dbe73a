"""The values the snapshotter hands out: Kind, Info, Usage, Mount."""

from __future__ import annotations

import dataclasses
import datetime
import enum


class Kind(enum.Enum):
    """What a snapshot is: a writable active snapshot, a read-only view, or a committed (read-only) layer."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"

    def __str__(self) -> str:
        return self.value


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def from_ns(ns: int) -> datetime.datetime:
    """An aware UTC datetime (microsecond precision) from nanoseconds since the epoch."""
    return _EPOCH + datetime.timedelta(microseconds=ns // 1000)


@dataclasses.dataclass(frozen=True)
class Info:
    """What :meth:`Snapshotter.stat` reports about a snapshot.

    ``name`` is the key of an active snapshot or view and the name of a committed one; ``parent`` is the name
    of the committed snapshot it is built on (None for a base). Only ``labels`` can be changed, with
    :meth:`Snapshotter.update`.
    """

    kind: Kind
    name: str
    parent: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    created: datetime.datetime | None = None
    updated: datetime.datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "parent": self.parent,
            "labels": dict(self.labels),
            "created": self.created.isoformat() if self.created else None,
            "updated": self.updated.isoformat() if self.updated else None,
        }


@dataclasses.dataclass(frozen=True)
class Usage:
    """Disk use of one snapshot's own layer (not its parents).

    ``size`` is in bytes allocated on disk (``st_blocks * 512``, as ``du`` counts: holes are free, a small file
    takes a whole block) and ``inodes`` counts objects, the layer directory itself included; an object with
    several hard links in the layer counts once (deduplicated by device and inode number).
    """

    size: int = 0
    inodes: int = 0

    def to_json(self) -> dict[str, int]:
        return {"size": self.size, "inodes": self.inodes}


@dataclasses.dataclass(frozen=True)
class Mount:
    """How to mount a snapshot, in containerd's terms: a file system type, a source and options.

    ``type`` is ``"bind"`` (``source`` is a directory; options ``rw|ro`` and ``rbind``) or ``"fuse.unionfs"``
    (``source`` is ``"unionfs"``; options ``lowerdir=``, and for active snapshots ``upperdir=``/``workdir=``).
    """

    type: str
    source: str
    options: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"type": self.type, "source": self.source, "options": list(self.options)}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """An image name in the store: its manifest and config (blobs of the store's content store, by digest) and
    ``top``, the name of the committed snapshot of its top layer (its chain ID; None for no layers)."""

    name: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    top: str | None
    platform: str
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    created: datetime.datetime | None = None
    updated: datetime.datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "manifest_digest": self.manifest_digest,
            "manifest_media_type": self.manifest_media_type,
            "config_digest": self.config_digest,
            "top": self.top,
            "platform": self.platform,
            "labels": dict(self.labels),
            "created": self.created.isoformat() if self.created else None,
            "updated": self.updated.isoformat() if self.updated else None,
        }
