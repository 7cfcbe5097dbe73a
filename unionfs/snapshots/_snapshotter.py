"""The snapshotter: containerd's snapshot lifecycle on directories served by unionfs.

A store (the *root*) holds ``metadata.db`` and ``snapshots/<id>/{fs,work}``. An active snapshot's ``fs`` is the
upper directory of its mount and ``work`` the workdir; its parents' ``fs`` directories, nearest first, are the
lower layers. Committing changes metadata only: the key becomes the name, the kind becomes committed and the
usage is frozen. Directory names never change after creation, so a chain is stable while it is in use.

Crash safety comes from ordering:

* prepare/view take the write lock, build the directories under a temporary name (``new-*``), insert the row,
  rename the directory to its id and only then commit; on an error the transaction rolls back and the
  directory goes. A crash leaves at most a directory no row refers to.
* remove commits the deletion of the row first and deletes the directory afterwards (renamed to ``rm-*``
  first, so that the deletion is claimed by one process). A crash leaves at most a directory no row refers to.
* a mount's record (``mounts/``, see :mod:`._mounts`) is written to a temporary file and renamed; a crash
  leaves at most a record of a mount that never happened, or a temporary file of a killed writer, both dead
  weight that the next mount, ``fsck --repair`` and cleanup delete.
* :meth:`Snapshotter.cleanup` removes such directories; :meth:`Snapshotter.fsck` reports (and repairs) every
  disagreement between the rows and the directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType

from .. import mountinfo
from ..fsutil import fsync_dir
from ..options import MountSpec, parse, render, spec_to_options, split_options
from ..xattrs import can_store_trusted
from . import _files, _filters, _mounts, _progress
from ._errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError
from ._mounts import Record as MountRecord
from ._store import ImageRow, Row, Store, Tx
from ._types import ImageInfo, Info, Kind, Mount, Usage, from_ns

log = logging.getLogger("unionfs.snapshots")

#: Environment variable naming the store, when no root is given explicitly.
ROOT_ENV = "UNIONFS_ROOT"
#: The most bytes a label's key and value may take together (containerd's limit).
MAX_LABEL_BYTES = 4096
#: The most bytes a key or name may take.
MAX_KEY_BYTES = 4096

#: The steps of prepare (and view), commit, remove, cleanup, ``fsck --repair`` and the recording of a mount
#: (begin_mount, begin_chain_mount) after which a crash leaves a distinct state: in particular the moments just
#: before and just after each SQLite transaction commits. ``crash_hook`` is called with each name as the step
#: completes (tests use it to kill the process at that point).
STEPS = (
    "prepare.locked", "prepare.tempdir", "prepare.inserted", "prepare.renamed", "prepare.committed",
    "commit.locked", "commit.usage", "commit.updated", "commit.committed",
    "remove.locked", "remove.deleted", "remove.committed", "remove.renamed", "remove.deleting", "remove.done",
    "cleanup.locked", "cleanup.claimed", "cleanup.committed", "cleanup.done",
    "fsck.locked", "fsck.repaired", "fsck.committed", "fsck.done",
    "mount.locked", "mount.recorded", "mount.committed",
)
crash_hook: Callable[[str], None] | None = None

#: Mount options that :meth:`Snapshotter.mount_spec` refuses among the caller's: they would replace what the
#: snapshot's layers are (or how their markers are read).
FIXED_MOUNT_OPTIONS = frozenset({"lowerdir", "upperdir", "workdir", "userxattr", "nouserxattr"})


def _step(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


def _widen_to(path: str, mode: int) -> None:
    """Give ``path`` the permission bits ``mode`` when it has only some of them: what ``mkdir`` under a umask
    leaves, also when a crash came between the mkdir and the chmod that follows it. Other modes (set on
    purpose) and a directory of another owner stay as they are."""
    with contextlib.suppress(OSError):  # best effort: never a reason not to open the store
        now = stat.S_IMODE(os.stat(path).st_mode)
        if now != mode and now & ~mode == 0:
            os.chmod(path, mode)


def default_root() -> str:
    """``$UNIONFS_ROOT``, else ``$XDG_DATA_HOME/unionfs``, else ``~/.local/share/unionfs``."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return os.path.abspath(env)
    data = os.environ.get("XDG_DATA_HOME")
    if not data or not os.path.isabs(data):
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "unionfs")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One disagreement :meth:`Snapshotter.fsck` found between the metadata and the directories.

    ``problem`` says what is wrong; for a repairable finding ``repair`` says what a repair does (``delete
    it``) and ``done`` what it did (``deleted``)."""

    subject: str
    problem: str
    repairable: bool
    repaired: bool = False
    repair: str = ""
    done: str = ""

    def __str__(self) -> str:
        if self.repaired:
            return f"{self.subject}: {self.problem}; {self.done or 'repaired'}"
        if self.repairable:
            return f"{self.subject}: {self.problem}; `fsck --repair` would {self.repair or 'repair it'}"
        return f"{self.subject}: {self.problem} (cannot be repaired)"

    def to_json(self) -> dict[str, object]:
        return {"subject": self.subject, "problem": self.problem, "repairable": self.repairable,
                "repaired": self.repaired, "repair": self.repair or None}


def _check_key(key: object, what: str = "key") -> str:
    if not isinstance(key, str):
        raise InvalidArgument(f"{what} must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if "\0" in key:
        raise InvalidArgument(f"{what} {key!r} contains a NUL character")
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    return key


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (labels or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"label {k!r}: keys and values must be strings")
        if not k:
            raise InvalidArgument("a label key must not be empty")
        if "\0" in k or "\0" in v:
            raise InvalidArgument(f"label {k!r} contains a NUL character")
        n = len(k.encode("utf-8", "surrogateescape")) + len(v.encode("utf-8", "surrogateescape"))
        if n > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {k!r}: key and value take {n} bytes, more than {MAX_LABEL_BYTES}")
        out[k] = v
    return out


def _check_mount_options(options: Sequence[str]) -> None:
    for text in options:
        for opt in split_options(text):
            name = opt.partition("=")[0]
            if name in FIXED_MOUNT_OPTIONS:
                raise InvalidArgument(
                    f"mount option {name!r} cannot be given for a snapshot: its layers and the xattr namespace "
                    "of their markers are the snapshot's"
                )


def _kind_with_article(kind: str) -> str:
    """The kind as it reads after "is": "a view", "active", "committed"."""
    return {"view": "a view"}.get(kind, kind)


class Snapshotter:
    """Snapshots stored under ``root`` (default: :func:`default_root`).

    Several Snapshotter objects, in one process or many, may use the same root at once: every change is one
    SQLite transaction holding the database's write lock. ``timeout`` is how long (seconds) an operation
    waits for another process's transaction to end. A missing store is created, unless ``create`` is false:
    NotFound then. ``progress`` (see :mod:`._progress`) shows the progress of long work; by default nothing
    is shown.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, timeout: float = 30.0,
                 create: bool = True, progress: _progress.Reporter | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        #: shows the progress of long work (measuring and deleting layers); quiet unless given
        self.progress: _progress.Reporter = progress or _progress.quiet
        if "\\" in self.root:
            raise InvalidArgument(f"root {self.root!r}: a backslash in the path cannot be expressed in mount options")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.empty_dir = os.path.join(self.root, "empty")
        #: where ``unionfs snapshot mount`` records the mounts it makes (see :mod:`._mounts`)
        self.mounts_dir = os.path.join(self.root, "mounts")
        self._registry = _mounts.Registry(self.mounts_dir)
        if not create and not (os.path.isfile(os.path.join(self.root, "metadata.db"))
                               and os.path.isdir(self.snapshots_dir)):
            raise NotFound(f"no store at {self.root}")
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for d, mode in ((self.snapshots_dir, 0o700), (self.empty_dir, 0o755)):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, mode)
                _widen_to(d, mode)
        except OSError as exc:
            raise FailedPrecondition(f"cannot create the store {self.root}: {exc.strerror}") from None
        self._store = Store(os.path.join(self.root, "metadata.db"), timeout)
        try:
            with self._store.read() as rtx:
                xattr = rtx.meta("xattr")
            if xattr is None:  # a new store: decided once, by whoever gets the write lock first
                with self._store.write() as tx:
                    xattr = tx.meta("xattr")
                    if xattr is None:
                        xattr = "trusted" if can_store_trusted(self.snapshots_dir) else "user"
                        tx.set_meta("xattr", xattr)
            #: the xattr namespace of overlay markers in this store's layers: "trusted" or "user"
            self.xattr = xattr
        except BaseException:
            self._store.close()
            raise

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the database; closing again does nothing, any other use afterwards fails."""
        self._store.close()

    def __enter__(self) -> Snapshotter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- paths -------------------------------------------------------------------------------------------------

    def _dir(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid))

    def _fs(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid), "fs")

    def _work(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid), "work")

    # -- creating ----------------------------------------------------------------------------------------------

    def prepare(self, key: str, parent: str | None = None, labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the active (writable) snapshot ``key`` on top of the committed snapshot ``parent`` (or
        empty) and return how to mount it.

        AlreadyExists when ``key`` is taken; NotFound when ``parent`` does not exist; FailedPrecondition when
        ``parent`` is not committed."""
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str | None = None, labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the read-only view ``key`` of the committed snapshot ``parent`` and return how to mount it.

        Errors as for :meth:`prepare`."""
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str | None, labels: Mapping[str, str] | None) -> list[Mount]:
        key = _check_key(key)
        if parent is not None and parent != "":
            _check_key(parent, "parent")
        labels = _check_labels(labels)
        made: str | None = None
        try:
            with self._store.write() as tx:
                _step("prepare.locked")
                if tx.get(key) is not None:
                    raise AlreadyExists(f'snapshot "{key}" already exists')
                ancestors: list[Row] = []
                if parent:
                    prow = tx.get(parent)
                    if prow is None:
                        raise NotFound(f'parent "{parent}" does not exist')
                    if prow.kind != Kind.COMMITTED.value:
                        raise FailedPrecondition(f'parent "{parent}" is {_kind_with_article(prow.kind)}, not committed')
                    ancestors = [prow, *tx.ancestors(prow.id)]
                made = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
                self._populate(made, kind, ancestors[0].id if ancestors else None)
                _step("prepare.tempdir")
                usage = (0, 0) if kind is Kind.VIEW else (None, None)
                sid = tx.insert(key, kind.value, ancestors[0].id if ancestors else None, labels, *usage)
                _step("prepare.inserted")
                final = self._dir(sid)
                if os.path.lexists(final):
                    # left by a crash before an earlier transaction committed (its id was never used)
                    self._reclaim(final)
                os.rename(made, final)
                made = final
                fsync_dir(self.snapshots_dir)
                _step("prepare.renamed")
        except BaseException:
            if made is not None:
                with contextlib.suppress(OSError):
                    _files.remove_tree(made)
            raise
        _step("prepare.committed")
        return self._mounts(kind, sid, ancestors)

    def _populate(self, tmp: str, kind: Kind, parent_id: int | None) -> None:
        fs = os.path.join(tmp, "fs")
        os.mkdir(fs, 0o755)
        os.chmod(fs, 0o755)
        if kind is Kind.ACTIVE:
            os.mkdir(os.path.join(tmp, "work"), 0o700)
        if parent_id is None:
            return
        # The root of the merged view shows the upper directory's owner and mode: take the parent's.
        try:
            pst = os.stat(self._fs(parent_id))
        except FileNotFoundError:
            raise FailedPrecondition(
                f"the directory of the parent ({self._fs(parent_id)}) is missing; run `unionfs snapshot fsck`"
            ) from None
        with contextlib.suppress(PermissionError):
            os.chown(fs, pst.st_uid, pst.st_gid)
        with contextlib.suppress(PermissionError):
            os.chmod(fs, stat.S_IMODE(pst.st_mode))

    # -- committing --------------------------------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``, which can then be a parent.

        The layer keeps its directory; its usage is measured now and frozen. The labels stay unless
        ``labels`` is given, which replaces them. NotFound when ``key`` does not exist; FailedPrecondition when
        it is not active; AlreadyExists when ``name`` is taken (also by ``key`` itself)."""
        name = _check_key(name, "name")
        key = _check_key(key)
        new_labels = None if labels is None else _check_labels(labels)
        with contextlib.ExitStack() as held, self._store.write() as tx:  # the lock outlives the transaction
            _step("commit.locked")
            row = tx.get(key)
            if row is None:
                raise NotFound(f'snapshot "{key}" does not exist')
            if row.kind != Kind.ACTIVE.value:
                raise FailedPrecondition(
                    f'snapshot "{key}" is {_kind_with_article(row.kind)}; only an active snapshot can be committed'
                )
            if tx.get(name) is not None:
                raise AlreadyExists(f'snapshot "{name}" already exists')
            held.enter_context(self._not_mounted(row, "commit"))
            try:
                with self.progress(f'commit "{key}": measuring its layer') as tick:
                    usage = _files.disk_usage(self._fs(row.id), tick)
            except FileNotFoundError:
                raise FailedPrecondition(
                    f'the directory of "{key}" is missing; run `unionfs snapshot fsck`'
                ) from None
            _step("commit.usage")
            tx.commit_active(row.id, name, row.labels if new_labels is None else new_labels,
                             usage.size, usage.inodes)
            _step("commit.updated")
        _step("commit.committed")
        log.info('committed "%s" as "%s": %d bytes, %d inodes', key, name, usage.size, usage.inodes)

    # -- removing ----------------------------------------------------------------------------------------------

    def remove(self, key: str) -> None:
        """Remove a snapshot of any kind, and its directory.

        NotFound when ``key`` does not exist; FailedPrecondition when snapshots are built on it or it is
        mounted."""
        self.remove_all([key])

    def remove_all(self, keys: Iterable[str]) -> None:
        """Remove every snapshot of ``keys`` and their directories, or none of them: all are checked first
        and removed in one transaction (a snapshot whose children are all among ``keys`` can go with them).

        When any cannot be removed, the error names every one that cannot and why; its kind is that of the
        first of them (NotFound, FailedPrecondition)."""
        wanted = list(dict.fromkeys(_check_key(k) for k in keys))
        if not wanted:
            return
        with contextlib.ExitStack() as held, self._store.write() as tx:  # the lock outlives the transaction
            _step("remove.locked")
            problems: list[SnapshotError] = []
            rows: list[Row] = []
            for key in wanted:
                row = tx.get(key)
                if row is None:
                    problems.append(NotFound(f'snapshot "{key}" does not exist'))
                else:
                    rows.append(row)
            going = {r.id for r in rows}
            for sid, names in sorted(tx.images_on(going).items()):
                key = next(r.key for r in rows if r.id == sid)
                problems.append(FailedPrecondition(
                    f'snapshot "{key}" is a layer of the image{"s" if len(names) > 1 else ""} '
                    f'{", ".join(names)}; remove {"them" if len(names) > 1 else "it"} with `unionfs image rm`'
                ))
            for row in rows:
                try:
                    held.enter_context(self._not_mounted(row, "remove"))
                except FailedPrecondition as exc:
                    problems.append(exc)
                    continue
                n = len(tx.child_ids(row.id) - going)
                if n:
                    problems.append(FailedPrecondition(
                        f'snapshot "{row.key}" has {n} {"child" if n == 1 else "children"}; remove '
                        f'{"it" if n == 1 else "them"} first'
                    ))
            if problems:
                first = problems[0]
                message = "; ".join(str(p) for p in problems)
                if len(problems) > 1:
                    message = f"nothing removed: {message}"
                raise type(first)(message)
            # children before their parents, so that no row ever refers to a deleted one
            by_id = {r.id: r for r in rows}
            depth = {r.id: len(tx.ancestors(r.id)) for r in rows}
            for sid in sorted(by_id, key=lambda i: -depth[i]):
                tx.delete(sid)
            _step("remove.deleted")
        _step("remove.committed")
        for row in rows:
            try:
                with self.progress(f'rm "{row.key}": deleting its layer') as tick:
                    self._reclaim(self._dir(row.id), progress=True, tick=tick)
            except OSError as exc:  # the snapshot is gone; cleanup() reclaims what is left
                log.warning("removed %s but could not delete %s: %s", row.key, self._dir(row.id), exc.strerror)
            else:
                log.info('removed "%s" (snapshots/%d)', row.key, row.id)
        _step("remove.done")

    def _where_mounted(self, row: Row) -> list[str]:
        """Where snapshot ``row`` is in use by a mount: mounts of it or of a snapshot built on it recorded by
        ``unionfs snapshot mount``, and bind mounts of its layer directory (or of a directory beneath it)."""
        table = mountinfo.read()
        where = []
        for r in self._registry.live(table):
            if row.id in r.ids:
                mp = os.fsdecode(r.mountpoint)
                where.append(mp if r.ids[0] == row.id else f'{mp} (a mount of "{r.key}", built on it)')
        where += [os.fsdecode(mp) for mp in _mounts.bind_mounts(self._fs(row.id), table)]
        return list(dict.fromkeys(where))

    @contextlib.contextmanager
    def _not_mounted(self, row: Row, verb: str) -> Iterator[None]:
        """FailedPrecondition when snapshot ``row`` is in use by a mount (:meth:`_where_mounted`); for an
        active snapshot, hold its workdir lock (the one a unionfs server holds while it serves the snapshot)
        meanwhile, so that no mount of it can start."""
        where = self._where_mounted(row)
        if where:
            raise FailedPrecondition(
                f'snapshot "{row.key}" is mounted on {", ".join(where)}; unmount it before you {verb} it'
            )
        if row.kind != Kind.ACTIVE.value:
            yield
            return
        try:
            fd = os.open(self._work(row.id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # fsck's business; nothing can be mounted without it
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FailedPrecondition(
                    f'snapshot "{row.key}" is mounted (its work directory is in use by a unionfs server); '
                    f"unmount it before you {verb} it"
                ) from None
            yield
        finally:
            os.close(fd)

    def _reclaim(self, path: str, progress: bool = False, tick: _progress.Tick | None = None) -> None:
        """Claim ``path`` by renaming it to ``rm-*`` (only one process wins the rename), then delete it
        (``tick`` is called for each entry deleted)."""
        trash = os.path.join(self.snapshots_dir, f"rm-{os.path.basename(path)}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if progress:
            _step("remove.renamed")
        first = [progress]

        def deleted() -> None:
            if first[0]:
                first[0] = False
                _step("remove.deleting")
            if tick is not None:
                tick()

        _files.remove_tree(trash, deleted)

    # -- images ------------------------------------------------------------------------------------------------

    def _image_info(self, tx: Tx, row: ImageRow) -> ImageInfo:
        top = tx.by_id(row.top_id) if row.top_id is not None else None
        return ImageInfo(name=row.name, manifest_digest=row.manifest_digest,
                         manifest_media_type=row.manifest_media_type, config_digest=row.config_digest,
                         top=top.key if top else None, platform=row.platform, labels=dict(row.labels),
                         created=from_ns(row.created_ns), updated=from_ns(row.updated_ns))

    @staticmethod
    def check_image_name(name: str) -> str:
        """``name`` if it can name an image (InvalidArgument otherwise)."""
        return _check_key(name, "image name")

    def put_image(self, name: str, *, manifest_digest: str, manifest_media_type: str, config_digest: str,
                  top: str | None, platform: str, labels: Mapping[str, str] | None = None) -> ImageInfo:
        """Name an image: ``name`` now stands for the manifest ``manifest_digest`` whose layers are the chain of
        the committed snapshot ``top`` (None: no layers). An existing name is pointed at the new image.

        NotFound when ``top`` does not exist, FailedPrecondition when it is not committed."""
        name = _check_key(name, "image name")
        checked = _check_labels(labels)
        with self._store.write() as tx:
            top_id = None
            if top is not None:
                row = self._get(tx, top)
                if row.kind != Kind.COMMITTED.value:
                    raise FailedPrecondition(f'snapshot "{top}" is {_kind_with_article(row.kind)}, not committed')
                top_id = row.id
            tx.put_image(name, manifest_digest, manifest_media_type, config_digest, top_id, platform, checked)
            stored = tx.image(name)
            assert stored is not None
            return self._image_info(tx, stored)

    def image(self, name: str) -> ImageInfo:
        """The image ``name`` (NotFound when there is none)."""
        with self._store.read() as tx:
            row = tx.image(name)
            if row is None:
                raise NotFound(f'image "{name}" does not exist')
            return self._image_info(tx, row)

    def images(self) -> list[ImageInfo]:
        """Every image, by name."""
        with self._store.read() as tx:
            return [self._image_info(tx, row) for row in tx.images()]

    def image_chain(self, name: str) -> list[str]:
        """The names of the committed snapshots of image ``name``'s layers, bottom first."""
        with self._store.read() as tx:
            row = tx.image(name)
            if row is None:
                raise NotFound(f'image "{name}" does not exist')
            if row.top_id is None:
                return []
            top = tx.by_id(row.top_id)
            assert top is not None
            return [a.key for a in reversed(tx.ancestors(top.id))] + [top.key]

    def remove_image(self, name: str) -> list[str]:
        """Remove the name ``name``, and the snapshots of its chain that nothing uses any more (no other image,
        no snapshot built on them); returns the names of the snapshots removed, top first.

        NotFound when there is no such image. The name and those snapshots go in one transaction."""
        with contextlib.ExitStack() as held, self._store.write() as tx:
            row = tx.image(name)
            if row is None:
                raise NotFound(f'image "{name}" does not exist')
            chain: list[Row] = []
            if row.top_id is not None:
                top = tx.by_id(row.top_id)
                assert top is not None
                chain = [top, *tx.ancestors(top.id)]
                where = self._where_mounted(top)
                if where:
                    raise FailedPrecondition(
                        f'image "{name}" is mounted on {", ".join(where)}; unmount it before you remove it'
                    )
            tx.delete_image(name)
            used = tx.images_on({r.id for r in chain})
            going: list[Row] = []
            for r in chain:  # top first: once one stays, those beneath it stay too
                if r.id in used or tx.child_ids(r.id) - {g.id for g in going}:
                    break
                try:
                    held.enter_context(self._not_mounted(r, "remove"))
                except FailedPrecondition:
                    break
                going.append(r)
            for r in going:
                tx.delete(r.id)
        for r in going:
            try:
                with self.progress(f'image rm "{name}": deleting the layer {r.key}') as tick:
                    self._reclaim(self._dir(r.id), progress=True, tick=tick)
            except OSError as exc:
                log.warning("removed %s but could not delete %s: %s", r.key, self._dir(r.id), exc.strerror)
        return [r.key for r in going]

    # -- layers ------------------------------------------------------------------------------------------------

    def layer_dirs(self, key: str) -> tuple[str, list[str]]:
        """The layer directory of snapshot ``key`` (the upper directory of an active snapshot) and those of its
        parents, nearest first (NotFound when there is no such snapshot)."""
        with self._store.read() as tx:
            row = self._get(tx, key)
            return self._fs(row.id), [self._fs(a.id) for a in tx.ancestors(row.id)]

    @contextlib.contextmanager
    def editing(self, key: str, verb: str) -> Iterator[tuple[str, list[str]]]:
        """Hold the active snapshot ``key`` unmounted (no mount of it can start meanwhile) and give its layer
        directory and its parents', nearest first, for changing or reading the layer directly.

        NotFound when there is no such snapshot, FailedPrecondition when it is not active or is mounted."""
        with self._store.read() as tx:
            row = self._get(tx, key)
            if row.kind != Kind.ACTIVE.value:
                raise FailedPrecondition(
                    f'snapshot "{key}" is {_kind_with_article(row.kind)}; only an active snapshot can be changed'
                )
            lowers = [self._fs(a.id) for a in tx.ancestors(row.id)]
        with self._not_mounted(row, verb):
            yield self._fs(row.id), lowers

    # -- reading -----------------------------------------------------------------------------------------------

    def _info(self, row: Row, parent: str | None) -> Info:
        return Info(kind=Kind(row.kind), name=row.key, parent=parent, labels=dict(row.labels),
                    created=from_ns(row.created_ns), updated=from_ns(row.updated_ns))

    def _get(self, tx: Tx, key: str) -> Row:
        row = tx.get(_check_key(key))
        if row is None:
            raise NotFound(f'snapshot "{key}" does not exist')
        return row

    def stat(self, key: str) -> Info:
        """What is known about snapshot ``key`` (NotFound when there is none)."""
        with self._store.read() as tx:
            row = self._get(tx, key)
            parent = tx.by_id(row.parent_id) if row.parent_id is not None else None
            return self._info(row, parent.key if parent else None)

    def walk(self, filters: Iterable[str] | str = ()) -> list[Info]:
        """Every snapshot matching any of ``filters`` (see :mod:`unionfs.snapshots._filters`), by name."""
        match = _filters.matcher([filters] if isinstance(filters, str) else filters)
        with self._store.read() as tx:
            rows = tx.all()
        names = {r.id: r.key for r in rows}
        infos = [self._info(r, names.get(r.parent_id) if r.parent_id is not None else None) for r in rows]
        return [i for i in infos if match(i)]

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        """Change the labels of snapshot ``info.name``; returns the updated info.

        Without field paths the labels become ``info.labels``. ``labels`` does the same; ``labels.KEY`` sets
        that one label from ``info.labels`` (or deletes it when ``info.labels`` lacks it or holds an empty
        value). Other fields cannot change: InvalidArgument."""
        key = _check_key(info.name, "name")
        paths = [fieldpaths] if isinstance(fieldpaths, str) else list(fieldpaths)
        given = _check_labels(info.labels)
        with self._store.write() as tx:
            row = self._get(tx, key)
            labels = dict(row.labels)
            if not paths:
                labels = dict(given)
            for fp in paths:
                if fp == "labels":
                    labels = dict(given)
                elif fp.startswith("labels.") and len(fp) > len("labels."):
                    name = fp[len("labels."):]
                    if given.get(name):
                        labels[name] = given[name]
                    else:
                        labels.pop(name, None)
                else:
                    raise InvalidArgument(f'cannot update field "{fp}" of a snapshot; only labels can change')
            _check_labels(labels)
            tx.set_labels(row.id, labels)
            row = self._get(tx, key)
            parent = tx.by_id(row.parent_id) if row.parent_id is not None else None
            return self._info(row, parent.key if parent else None)

    def usage(self, key: str) -> Usage:
        """Disk use of the snapshot's own layer: measured now for an active snapshot, as frozen at commit for a
        committed one (zero for a view, which has no layer of its own)."""
        with self._store.read() as tx:
            row = self._get(tx, key)
        if row.kind == Kind.ACTIVE.value:
            try:
                with self.progress(f'usage "{key}": measuring its layer') as tick:
                    usage = _files.disk_usage(self._fs(row.id), tick)
            except FileNotFoundError:
                raise FailedPrecondition(f'the directory of "{key}" is missing; run `unionfs snapshot fsck`') from None
            log.info('usage of "%s": %d bytes, %d inodes', key, usage.size, usage.inodes)
            return usage
        return Usage(size=row.size or 0, inodes=row.inodes or 0)

    # -- mounting ----------------------------------------------------------------------------------------------

    def _chain(self, key: str) -> tuple[Row, list[Row]]:
        with self._store.read() as tx:
            row = self._get(tx, key)
            if row.kind == Kind.COMMITTED.value:
                raise FailedPrecondition(
                    f'snapshot "{key}" is committed and cannot be mounted; mount a view of it '
                    f"(`unionfs snapshot view KEY {key}`) or prepare on it"
                )
            return row, tx.ancestors(row.id)

    def mounts(self, key: str) -> list[Mount]:
        """How to mount the active snapshot or view ``key`` (FailedPrecondition for a committed one).

        An active snapshot without parents is a read-write bind mount of its layer, a view of one layer a
        read-only bind mount of that layer, anything else a ``fuse.unionfs`` mount of the chain."""
        row, ancestors = self._chain(key)
        return self._mounts(Kind(row.kind), row.id, ancestors)

    def _union_spec(self, lowers: Sequence[str], active: int | None = None, *, readonly: bool = False,
                    pin_xattr: bool = False) -> MountSpec:
        """A unionfs mount of ``lowers`` (nearest first) and, for the ``active`` snapshot's id, of its layer
        and workdir. Markers in user.* xattrs give ``userxattr``; trusted.* ones give nothing (the server's
        choice for a root mount), or ``nouserxattr`` with ``pin_xattr``."""
        user = self.xattr == "user"
        return MountSpec(
            lowers=tuple(map(os.fsencode, lowers)),
            upper=None if active is None else os.fsencode(self._fs(active)),
            work=None if active is None else os.fsencode(self._work(active)),
            readonly=readonly,
            userxattr=True if user else (False if pin_xattr else None),
        )

    def _mounts(self, kind: Kind, sid: int, ancestors: list[Row]) -> list[Mount]:
        lowers = [self._fs(a.id) for a in ancestors]
        if kind is Kind.ACTIVE:
            if not lowers:
                return [Mount("bind", self._fs(sid), ("rw", "rbind"))]
            return [Mount("fuse.unionfs", "unionfs", tuple(spec_to_options(self._union_spec(lowers, sid))))]
        if len(lowers) <= 1:
            return [Mount("bind", lowers[0] if lowers else self._fs(sid), ("ro", "rbind"))]
        return [Mount("fuse.unionfs", "unionfs", tuple(spec_to_options(self._union_spec(lowers))))]

    def mount_spec(self, key: str, options: Sequence[str] = ()) -> MountSpec:
        """The unionfs mount that serves ``mounts(key)`` in every case (FailedPrecondition for a committed
        snapshot); mount it with :func:`unionfs.fuse.server.mount`.

        ``options`` are further ``-o`` texts that tune the mount (``timeout=``, ``allow_other``, ``ro``,
        ``uidmapping=``, ...); they win where they disagree with the snapshot's, but may not replace its
        layers or the xattr namespace of its markers: InvalidArgument for ``lowerdir``, ``upperdir``,
        ``workdir``, ``userxattr`` and ``nouserxattr``. (``ro`` only narrows what an active snapshot allows.)

        A bind mount becomes a unionfs mount of that one directory: read-only for a view, and for an active
        snapshot without parents a writable mount whose upper layer is the snapshot's layer above the store's
        empty directory. The xattr namespace of the markers is always given (``userxattr`` or
        ``nouserxattr``): the store's, whoever mounts."""
        _check_mount_options(options)
        row, ancestors = self._chain(key)
        lowers = [self._fs(a.id) for a in ancestors]
        if row.kind == Kind.ACTIVE.value:
            if not lowers:
                os.makedirs(self.empty_dir, mode=0o755, exist_ok=True)
                lowers = [self.empty_dir]
            spec = self._union_spec(lowers, row.id, pin_xattr=True)
        else:
            spec = self._union_spec(lowers or [self._fs(row.id)], readonly=True, pin_xattr=True)
        return parse([render(spec), *options]) if options else spec

    def mount_options(self, key: str) -> list[str]:
        """:meth:`mount_spec` as ``unionfs mount -o`` options; join them with
        :func:`unionfs.options.option_string`."""
        return spec_to_options(self.mount_spec(key))

    def begin_mount(self, key: str, mountpoint: str | os.PathLike[str],
                    options: Sequence[str] = ()) -> tuple[MountSpec, MountRecord]:
        """:meth:`mount_spec` of ``key``, and a record of the mount this process is about to make on
        ``mountpoint`` (which protects the snapshot and those beneath it from removal while it lasts). Call
        :meth:`mount_placed` once the mount is in place, or :meth:`mount_ended` when it failed or has ended.

        FailedPrecondition when ``key`` is an active snapshot that is mounted already (and where)."""
        spec = self.mount_spec(key, options)
        target = os.fsencode(os.path.realpath(mountpoint))
        with self._store.write() as tx:
            _step("mount.locked")
            row = self._get(tx, key)
            if row.kind == Kind.ACTIVE.value:
                try:
                    with self._not_mounted(row, "mount"):
                        pass
                except FailedPrecondition as exc:
                    raise FailedPrecondition(
                        str(exc).replace("before you mount it", "first: an active snapshot is mounted once at a time")
                        .replace("is mounted", "is already mounted", 1)
                    ) from None
            self._registry.prune(mountinfo.read())
            record = self._registry.add(target, row.key, [row.id, *(a.id for a in tx.ancestors(row.id))])
            _step("mount.recorded")
        _step("mount.committed")
        return spec, record

    def begin_chain_mount(self, name: str | None, mountpoint: str | os.PathLike[str],
                          options: Sequence[str] = ()) -> tuple[MountSpec, MountRecord | None]:
        """A read-only mount of the committed snapshot ``name`` over its parents (None: of nothing, an empty
        directory), with no snapshot made for it, and a record of it as :meth:`begin_mount` gives (None for
        nothing), which keeps those snapshots from removal while the mount lasts. ``options`` as for
        :meth:`mount_spec`."""
        _check_mount_options(options)
        if name is None:
            spec = self._union_spec([self.empty_dir], readonly=True, pin_xattr=True)
            return (parse([render(spec), *options]) if options else spec), None
        target = os.fsencode(os.path.realpath(mountpoint))
        with self._store.write() as tx:
            _step("mount.locked")
            row = self._get(tx, name)
            if row.kind != Kind.COMMITTED.value:
                raise FailedPrecondition(f'snapshot "{name}" is {_kind_with_article(row.kind)}, not committed')
            chain = [row, *tx.ancestors(row.id)]
            spec = self._union_spec([self._fs(r.id) for r in chain], readonly=True, pin_xattr=True)
            self._registry.prune(mountinfo.read())
            record = self._registry.add(target, row.key, [r.id for r in chain])
            _step("mount.recorded")
        _step("mount.committed")
        return (parse([render(spec), *options]) if options else spec), record

    def mount_placed(self, record: MountRecord) -> None:
        """The mount of ``record`` (:meth:`begin_mount`) is in place; its record outlives this process."""
        if not self._registry.placed(record):
            self._registry.drop(record)

    def mount_ended(self, record: MountRecord) -> None:
        """The mount of ``record`` failed, or has ended (a mount served in the foreground)."""
        self._registry.drop(record)

    # -- housekeeping ------------------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Delete every entry of ``snapshots/`` that no snapshot refers to (left by a crash or an interrupted
        remove); returns their names. Records of mounts that have ended, and the temporary files of records
        whose writer was killed, go too (as every mount and ``fsck --repair`` deletes them)."""
        with self._store.write() as tx:
            _step("cleanup.locked")
            claimed = self._claim_orphans(tx.ids())
            self._registry.prune(mountinfo.read())
            _step("cleanup.claimed")
        _step("cleanup.committed")
        for name, path in claimed:
            with self.progress(f"cleanup: deleting snapshots/{name}") as tick:
                _files.remove_tree(path, tick)
            log.info("cleanup: deleted snapshots/%s", name)
        _step("cleanup.done")
        return [name for name, _path in claimed]

    def _claim_orphans(self, ids: set[int]) -> list[tuple[str, str]]:
        """Rename orphans to ``rm-*`` (under the write lock: no ``new-*`` or uncommitted ``<id>`` directory
        of a running operation can exist meanwhile) and return (original name, new path)."""
        claimed = []
        with os.scandir(self.snapshots_dir) as it:
            entries = sorted(e.name for e in it)
        for name in entries:
            if name.isdigit() and int(name) in ids:
                continue
            path = os.path.join(self.snapshots_dir, name)
            if name.startswith("rm-"):
                claimed.append((name, path))
                continue
            trash = os.path.join(self.snapshots_dir, f"rm-{name}-{secrets.token_hex(4)}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue
            claimed.append((name, trash))
        return claimed

    def fsck(self, repair: bool = False) -> list[Finding]:
        """Every disagreement between the metadata and ``snapshots/``; with ``repair``, fix what can be fixed.

        Found and repaired: directories no snapshot refers to (deleted), a missing ``work`` directory of an
        active snapshot (recreated), a committed snapshot without frozen usage (measured). A snapshot whose
        directory or layer is missing is unrecoverable: repair forgets it when nothing is built on it and no
        image has it as a layer, and only reports it otherwise. Database corruption is reported, never repaired."""
        findings: list[Finding] = []
        claimed: list[tuple[str, str]] = []
        dropped: set[int] = set()
        ctx = self._store.write() if repair else self._store.read()
        step = _step if repair else (lambda name: None)
        with ctx as tx:
            step("fsck.locked")
            for problem in tx.integrity():
                findings.append(Finding("metadata.db", problem, repairable=False))
            rows = {r.id: r for r in tx.all()}
            children: dict[int, int] = {}
            for r in rows.values():
                if r.parent_id is not None:
                    children[r.parent_id] = children.get(r.parent_id, 0) + 1
            images = tx.images_on(set(rows))
            for r in rows.values():
                subject = f'snapshot "{r.key}" (snapshots/{r.id})'
                parent = rows.get(r.parent_id) if r.parent_id is not None else None
                if r.parent_id is not None and (parent is None or parent.kind != Kind.COMMITTED.value):
                    what = "missing" if parent is None else parent.kind
                    findings.append(Finding(subject, f"its parent (id {r.parent_id}) is {what}", repairable=False))
                if not os.path.isdir(self._fs(r.id)):
                    lost = "directory" if not os.path.isdir(self._dir(r.id)) else "layer directory fs"
                    if children.get(r.id):
                        findings.append(Finding(subject, f"its {lost} is missing and snapshots are built on it",
                                                repairable=False))
                        continue
                    if images.get(r.id):
                        names = images[r.id]
                        findings.append(Finding(
                            subject, f"its {lost} is missing and it is a layer of the image"
                            f'{"s" if len(names) > 1 else ""} {", ".join(names)}; remove '
                            f'{"them" if len(names) > 1 else "it"} with `unionfs image rm`', repairable=False))
                        continue
                    if repair:
                        tx.delete(r.id)
                        dropped.add(r.id)
                    findings.append(Finding(subject, f"its {lost} is missing", repairable=True, repaired=repair,
                                            repair="forget the snapshot", done="the snapshot is forgotten"))
                    continue
                if r.kind == Kind.ACTIVE.value and not os.path.isdir(self._work(r.id)):
                    if repair:
                        os.mkdir(self._work(r.id), 0o700)
                    findings.append(Finding(subject, "its work directory is missing", repairable=True,
                                            repaired=repair, repair="recreate it", done="recreated"))
                if r.kind == Kind.COMMITTED.value and (r.size is None or r.inodes is None):
                    if repair:
                        with self.progress(f'fsck: measuring "{r.key}"') as tick:
                            u = _files.disk_usage(self._fs(r.id), tick)
                        tx.set_usage(r.id, u.size, u.inodes)
                        log.info('fsck: measured "%s": %d bytes, %d inodes', r.key, u.size, u.inodes)
                    findings.append(Finding(subject, "its usage was never recorded", repairable=True,
                                            repaired=repair, repair="measure it", done="measured"))
            findings += self._gone_mounts(set(rows) - dropped, {r.id: r.key for r in rows.values()})
            if repair:
                self._registry.prune(mountinfo.read())
            ids = set(rows) - dropped
            with os.scandir(self.snapshots_dir) as it:  # (the directories of dropped records are reported above)
                orphans = sorted(e.name for e in it if not (e.name.isdigit() and int(e.name) in rows))
            for name in orphans:
                why = ("an interrupted deletion" if name.startswith("rm-") else
                       "an interrupted creation" if name.startswith("new-") else "no snapshot refers to it")
                findings.append(Finding(f"snapshots/{name}", f"orphan ({why})", repairable=True,
                                        repaired=repair, repair="delete it", done="deleted"))
            if repair:
                claimed += self._claim_orphans(ids)
            step("fsck.repaired")
        step("fsck.committed")
        for name, path in claimed:
            with self.progress(f"fsck: deleting snapshots/{name}") as tick:
                _files.remove_tree(path, tick)
            log.info("fsck: deleted snapshots/%s", name)
        step("fsck.done")
        return findings

    def _gone_mounts(self, ids: set[int], keys: Mapping[int, str]) -> list[Finding]:
        """Mounts that serve directories of snapshots that no longer exist (never repaired: unmount them)."""
        table = mountinfo.read()
        findings = []
        for r in self._registry.live(table):
            gone = [i for i in r.ids if i not in ids]
            if gone:
                findings.append(Finding(
                    f"the mount on {os.fsdecode(r.mountpoint)}",
                    f'it serves "{r.key}", but snapshots/{gone[0]} of it no longer exists; unmount it',
                    repairable=False))
        where = _mounts.fs_path(self.snapshots_dir, table)
        if where is not None:
            dev, top = where
            prefix = top.rstrip(b"/") + b"/"
            for e in table:
                if (e.major, e.minor) != dev or not e.root.startswith(prefix):
                    continue
                name = e.root[len(prefix):].split(b"/")[0]
                if name.isdigit() and int(name) in ids:
                    continue
                known = keys.get(int(name)) if name.isdigit() else None
                what = f'of "{known}", ' if known else ""
                findings.append(Finding(
                    f"the mount on {os.fsdecode(e.mount_point)}",
                    f"it shows snapshots/{os.fsdecode(name)} {what}which no snapshot refers to; unmount it",
                    repairable=False))
        return findings
