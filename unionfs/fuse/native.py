"""The native part (:mod:`unionfs._native`) in the FUSE shell: whether a server runs with it, and what it asks of it.

The shim must be in the process before pyfuse3 is imported, so every way into a server calls :func:`prepare`
before it imports :mod:`unionfs.fuse.serve`: the forked server of ``unionfs mount``, the foreground server,
and the first server that starts a spare (:mod:`unionfs.fuse.spare`; the spare, forked once pyfuse3 is loaded,
and the servers it forks inherit whatever that server loaded). :func:`configure`, called by
:func:`unionfs.fuse.serve.serve` once logging is set up, turns the shim's features on for a mount that wants
them (or off, for ``-o nonative`` in a process that has the shim); :func:`report` logs one line saying which
mode serves once the mount is made.

This module loads neither pyfuse3 nor the shim, nor :mod:`unionfs._native` (ctypes: ~10 ms of a command's
start) at its import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import MountSpec

if TYPE_CHECKING:
    from .. import _native

log = logging.getLogger("unionfs")

#: ``UNIONFS_NATIVE=off`` in a server's environment serves every mount it starts as ``-o nonative`` would (the
#: test suites run once in each mode with it)
MODE_ENV = "UNIONFS_NATIVE"

#: the spare kinds (:func:`spare_kind`)
NATIVE, PURE = "native", "pure"

#: whether cached listings are turned on for a native mount (the shell invalidates what the kernel cannot see)
CACHED_LISTINGS = True
#: whether a native mount's directories are opened by the kernel without OPENDIR (and closed without
#: RELEASEDIR): the shim answers the first OPENDIR ENOSYS; listings are cached all the same
OPENLESS_DIRS = True
#: ``UNIONFS_NATIVE_OPENLESS=off``: directories are opened through Python's opendir again
OPENLESS_ENV = "UNIONFS_NATIVE_OPENLESS"
#: whether a thread of the shim reads the device of a mount with the data path, answering READ and WRITE itself
#: (pyfuse3 gets the rest from it); ``UNIONFS_NATIVE_READER=off`` leaves the device to pyfuse3
OWN_READER = True
READER_ENV = "UNIONFS_NATIVE_READER"
#: whether GETATTR of a directory is answered by the shim from the attributes Python gave last, while nothing
#: may have changed since (the kernel asks again after each listing it did not have cached);
#: ``UNIONFS_NATIVE_ATTRS=off`` sends every GETATTR to Python
DIR_ATTRS = True
ATTRS_ENV = "UNIONFS_NATIVE_ATTRS"
#: whether a read-only OPEN of a file the shell named is answered by the shim's reader (it opens the file named,
#: serves it and closes it at RELEASE: no Python) while nothing may have changed since the shell named it; with
#: the data path, the shim's fsync and directory attributes (whose change tracking it shares);
#: ``UNIONFS_NATIVE_OPENS=off`` sends every OPEN to Python
NATIVE_OPENS = True
OPENS_ENV = "UNIONFS_NATIVE_OPENS"
#: whether, once a listing is merged, the shim's threads read ahead (into the kernel's caches) the directories of
#: the layers its subdirectories are made of, which a walk of the tree lists next;
#: ``UNIONFS_NATIVE_PREFETCH=off`` reads each only when the kernel asks for its listing
PREFETCH_DIRS = True
PREFETCH_ENV = "UNIONFS_NATIVE_PREFETCH"
#: whether the kernel's adaptive readdirplus is turned on for a native mount (plain READDIR is then served too)
READDIRPLUS_AUTO = False

#: the data requests of open files (READ, WRITE, FALLOCATE, LSEEK, COPY_FILE_RANGE) are served by the shim on the
#: descriptor the open handler chose, without Python; ``UNIONFS_NATIVE_DATA=off`` keeps them in Python
DATA_ENV = "UNIONFS_NATIVE_DATA"

_why = "not asked for yet"
#: the line :func:`report` logs
_report = ""


def data_path(spec: MountSpec) -> bool:
    """Whether the shim is to serve the data requests of open files of a native mount of ``spec``
    (unless ``UNIONFS_NATIVE_DATA=off``; never with ``-d``, whose log shows every request)."""
    return os.environ.get(DATA_ENV, "").lower() not in _OFF and not spec.debug


def wanted(spec: MountSpec) -> bool:
    """Whether ``spec`` is to be served natively (when the shim loads): not with ``-o nonative``, nor with
    ``UNIONFS_NATIVE=off``."""
    return spec.native and os.environ.get(MODE_ENV, "").lower() not in _OFF


_OFF = ("off", "0", "no", "pure")


def prepare(spec: MountSpec) -> _native.Native | None:
    """Load the shim for a server of ``spec`` (before pyfuse3 is imported), unless ``-o nonative``; None when
    it is not loaded, :func:`reason` saying why."""
    global _why
    from .. import _native

    if not wanted(spec):
        _why = "-o nonative" if not spec.native else f"{MODE_ENV}={os.environ.get(MODE_ENV)}"
        return _native.loaded()
    native = _native.load()
    _why = _native.reason() if native is None else ""
    return native


def reason() -> str:
    """Why the last :func:`prepare` left this process without the shim (empty when it is loaded)."""
    return _why


def spare_kind(native: _native.Native | None) -> str:
    """The kind of server a spare forks, a part of its socket's name: a mount wanting the native part is handed
    only to a spare that has loaded the same library (:func:`wanted_kind`), one in the pure mode only to a
    spare without it."""
    return f"{NATIVE}:{native.path}" if native is not None else PURE


def wanted_kind(spec: MountSpec) -> str:
    """The spare kind a command asks for: :data:`NATIVE` and the library a server would load
    (:func:`unionfs._native.library_path`, found here without loading ctypes: a command must not pay for it)
    when the mount wants the native part and a library is there, else :data:`PURE`."""
    return default_kind() if spec.native else PURE


def default_kind() -> str:
    """:func:`wanted_kind` of a mount without ``-o nonative``."""
    if os.environ.get(MODE_ENV, "").lower() in _OFF:
        return PURE
    env = os.environ.get("UNIONFS_NATIVE_LIB")
    if env:
        return f"{NATIVE}:{Path(env)}"
    found = sorted((Path(__file__).parent.parent / "_native").glob("_shim*.so"))
    return f"{NATIVE}:{found[0]}" if found else PURE


def configure(spec: MountSpec) -> _native.Native | None:
    """Set the shim's features for serving ``spec`` in this process (:func:`report` then logs which mode
    serves); returns the shim when the mount is served natively, None in the pure mode."""
    from .. import _native

    global _report
    native = _native.loaded()
    if native is None:
        _report = f"native part not loaded ({_why or _native.reason()}): serving in the pure mode"
        return None
    on = wanted(spec)
    native.set_connection_tuning(on)
    # (UNIONFS_NATIVE_CONFIG, read by the shim, may have turned either on already: kept then)
    native.set_cached_listings(on and (CACHED_LISTINGS or native.cached_listings))
    native.set_readdirplus_auto(on and (READDIRPLUS_AUTO or native.readdirplus_auto))
    native.set_data_ops(on and data_path(spec))
    native.set_openless_dirs(on and OPENLESS_DIRS and os.environ.get(OPENLESS_ENV, "").lower() not in _OFF)
    native.set_own_reader(on and data_path(spec) and OWN_READER and os.environ.get(READER_ENV, "").lower() not in _OFF)
    native.set_fsync(on and data_path(spec) and spec.fsync)
    native.set_dir_attrs(on and DIR_ATTRS and not spec.debug and os.environ.get(ATTRS_ENV, "").lower() not in _OFF)
    native.set_opens(on and NATIVE_OPENS and native.dir_attrs and native.fsync and native.own_reader
                     and native.data_ops and os.environ.get(OPENS_ENV, "").lower() not in _OFF)
    native.set_prefetch(on and PREFETCH_DIRS and os.environ.get(PREFETCH_ENV, "").lower() not in _OFF)
    if not on:
        why = "-o nonative" if not spec.native else f"{MODE_ENV}={os.environ.get(MODE_ENV)}"
        _report = f"native part loaded but switched off ({why}): serving in the pure mode"
        return None
    features = ["connection tuning"] + (["cached listings"] if native.cached_listings else []) + (
        ["open-less directories"] if native.openless_dirs else []) + (
        ["adaptive readdirplus"] if native.readdirplus_auto else []) + (
        ["data path"] if native.data_ops else []) + (["own reader"] if native.own_reader else []) + (
        ["fsync"] if native.fsync else []) + (["directory attributes"] if native.dir_attrs else []) + (
        ["read-only opens"] if native.opens else []) + (["directory prefetch"] if native.prefetch else [])
    _report = f"native part: {native.version()} ({', '.join(features)})"
    return native


def report() -> None:
    """Log which mode serves (what the last :func:`configure` found): once the mount is made, so that a mount
    that fails says only why."""
    if _report:
        log.info("%s", _report)


def version_line() -> str:
    """The second line of ``unionfs --version``: whether the native part is available, and why not."""
    from .. import _native

    try:
        found = _native.version()
    except OSError as exc:  # (a library that cannot even be opened)
        return f"native part: not available ({exc})"
    if found is not None:
        return f"native part: available ({found})"
    path = _native.library_path()
    if path is None:
        why = "no native library was built (it needs gcc and libfuse3's headers at install)"
    elif not path.exists():
        why = f"{path} does not exist"
    else:
        why = _native._probe(path)[1] or "it does not fit this libfuse"
    return f"native part: not available: {why}"
