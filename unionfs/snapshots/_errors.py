"""Typed snapshot errors, one class per kind of failure (the kinds of containerd's errdefs).

Every error carries a one-line message meant for the user and the exit status the ``unionfs snapshot``
command ends with when it is the reason of the failure.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base of every error the snapshotter raises on purpose."""

    #: the short name printed before the message by the command line
    kind = "error"
    #: exit status of ``unionfs snapshot`` when this error ends the command
    exit_status = 1


class NotFound(SnapshotError):
    """The key (or a parent named by it) does not exist."""

    kind = "not found"
    exit_status = 3


class AlreadyExists(SnapshotError):
    """The key or name is taken: keys of active snapshots, views and names of committed ones share one space."""

    kind = "already exists"
    exit_status = 4


class FailedPrecondition(SnapshotError):
    """The operation does not apply to the snapshot in its present state (committed, has children, ...)."""

    kind = "failed precondition"
    exit_status = 5


class InvalidArgument(SnapshotError):
    """A malformed key, label, filter or field path."""

    kind = "invalid argument"
    exit_status = 6
