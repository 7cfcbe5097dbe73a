"""Snapshots: build and run layer chains with containerd's snapshotter model, every mount served by unionfs.

::

    from unionfs.snapshots import Snapshotter

    with Snapshotter("/var/tmp/store") as sn:
        sn.prepare("build", None)              # an active (writable) snapshot
        ...                                    # mount it: `unionfs snapshot mount build MNT`
        sn.commit("base", "build")             # now a read-only layer usable as a parent
        sn.prepare("app", "base")

The package imports neither pyfuse3 nor trio; mounting goes through the ``unionfs snapshot mount`` command
(or ``unionfs.fuse.server.mount(sn.mount_spec(key), mountpoint)``).
"""

from ..options import option_string
from ._errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from ._snapshotter import STEPS, Finding, Snapshotter, default_root
from ._types import ImageInfo, Info, Kind, Mount, Usage

__all__ = [
    "STEPS",
    "AlreadyExists",
    "FailedPrecondition",
    "Finding",
    "ImageInfo",
    "Info",
    "InvalidArgument",
    "Kind",
    "Mount",
    "NotFound",
    "SnapshotError",
    "Snapshotter",
    "Usage",
    "default_root",
    "option_string",
]
