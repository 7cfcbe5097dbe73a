"""Where the snapshots of a store are mounted: records of the mounts ``unionfs snapshot mount`` made, checked
against the mount table, and bind mounts of layer directories found in the mount table itself.

A unionfs mount does not show its layers in ``/proc/self/mountinfo`` (its source is its fsname), so the
command records each mount it makes in ``mounts/<token>.json`` under the store: the mount point, the key, the
ids of the snapshot and of every snapshot beneath it, the process that is making it, and, once the mount is in
place, its device number. A record whose device is known is live while the mount table holds a mount of that
device on that mount point; one whose device is not known yet (being mounted, or served in the foreground) is
live while its process runs, or while a unionfs mount is on its mount point (its process was killed after it
mounted and before it recorded the device). Records that are no longer live are dead weight, deleted when met under the
store's write lock.

A bind mount (what ``unionfs snapshot mounts`` prints for a chain of one layer) shows in the mount table as a
mount whose root is the layer directory, or a directory beneath it, on the layer's device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from collections.abc import Iterable, Sequence

from .. import mountinfo
from ..mountinfo import MountEntry

#: The file system type of a unionfs mount in the mount table.
FSTYPE = b"fuse.unionfs"


@dataclasses.dataclass(frozen=True)
class Record:
    """One mount made by ``unionfs snapshot mount``."""

    path: str
    mountpoint: bytes
    key: str
    #: the mounted snapshot's id, then the ids of the snapshots beneath it (nearest first)
    ids: tuple[int, ...]
    pid: int
    #: (major, minor) of the mount once it is in place
    dev: tuple[int, int] | None = None

    def live(self, table: Sequence[MountEntry]) -> bool:
        if self.dev is not None:
            return any(e.mount_point == self.mountpoint and (e.major, e.minor) == self.dev for e in table)
        # being mounted; or mounted by a process killed before it could record the device: live while a
        # unionfs mount is on its mount point
        return _running(self.pid) or any(e.mount_point == self.mountpoint and e.fstype == FSTYPE for e in table)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a process id at all
        return False
    return True


def _encode(record: Record) -> bytes:
    return json.dumps({
        "mountpoint": os.fsdecode(record.mountpoint), "key": record.key, "ids": list(record.ids),
        "pid": record.pid, "dev": list(record.dev) if record.dev is not None else None,
    }).encode()


def _decode(path: str, data: bytes) -> Record | None:
    try:
        v = json.loads(data)
        dev = v["dev"]
        return Record(path=path, mountpoint=os.fsencode(str(v["mountpoint"])), key=str(v["key"]),
                      ids=tuple(int(i) for i in v["ids"]), pid=int(v["pid"]),
                      dev=None if dev is None else (int(dev[0]), int(dev[1])))
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Registry:
    """The mount records of one store (``DIR/<token>.json``)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def records(self) -> list[Record]:
        """Every readable record (an unreadable or half-written one counts as none)."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            path = os.path.join(self.dir, name)
            try:
                with open(path, "rb") as f:
                    record = _decode(path, f.read())
            except FileNotFoundError:
                continue
            if record is not None:
                out.append(record)
        return out

    def live(self, table: Sequence[MountEntry]) -> list[Record]:
        return [r for r in self.records() if r.live(table)]

    def strays(self) -> list[str]:
        """The temporary files of records whose writer is gone (killed between writing one and renaming it to
        its name): ``<token>.json.<pid>-<hex>.tmp``, and any other ``*.tmp`` without a process id."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".tmp"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            writer = name[:-len(".tmp")].rpartition(".")[2].partition("-")[0]
            if writer.isdigit() and _running(int(writer)):
                continue
            out.append(os.path.join(self.dir, name))
        return out

    def prune(self, table: Sequence[MountEntry]) -> None:
        """Delete the records that are no longer live, and the strays (call it under the store's write lock)."""
        dead = [r.path for r in self.records() if not r.live(table)]
        for path in dead + self.strays():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _write(self, record: Record) -> None:
        tmp = f"{record.path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as f:
            f.write(_encode(record))
        os.replace(tmp, record.path)

    def add(self, mountpoint: bytes, key: str, ids: Iterable[int]) -> Record:
        """Record a mount being made by this process (its device not known yet)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        record = Record(path=os.path.join(self.dir, f"{secrets.token_hex(8)}.json"), mountpoint=mountpoint,
                        key=key, ids=tuple(ids), pid=os.getpid())
        self._write(record)
        return record

    def placed(self, record: Record) -> bool:
        """The mount of ``record`` is in place: record its device, so that it stays live without this process.
        False when the mount table shows no unionfs mount on its mount point."""
        for e in reversed(mountinfo.read()):
            if e.mount_point == record.mountpoint and e.fstype == FSTYPE:
                self._write(dataclasses.replace(record, dev=(e.major, e.minor)))
                return True
        return False

    @staticmethod
    def drop(record: Record) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record.path)


def _inside(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top.rstrip(b"/") + b"/")


def fs_path(directory: str, table: Sequence[MountEntry]) -> tuple[tuple[int, int], bytes] | None:
    """The device of ``directory`` and its path within that file system (as mountinfo's root field reads), or
    None when the mount table does not show the file system it is on."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    real = os.fsencode(os.path.realpath(directory))
    best: MountEntry | None = None
    for e in table:
        if (e.major, e.minor) == dev and _inside(real, e.mount_point) and (
                best is None or len(e.mount_point) >= len(best.mount_point)):
            best = e
    if best is None:
        return None
    rest = real[len(best.mount_point.rstrip(b"/")):]
    return dev, (best.root.rstrip(b"/") + rest) or b"/"


def bind_mounts(directory: str, table: Sequence[MountEntry]) -> list[bytes]:
    """The mount points of the mounts that show ``directory``, or a directory beneath it, as their root."""
    where = fs_path(directory, table)
    if where is None:
        return []
    dev, path = where
    real = os.fsencode(os.path.realpath(directory))
    return [e.mount_point for e in table
            if (e.major, e.minor) == dev and _inside(e.root, path) and e.mount_point != real]
