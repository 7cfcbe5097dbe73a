"""The metadata store: one SQLite database in WAL mode, changed only inside ``BEGIN IMMEDIATE`` transactions.

A write transaction takes the database's write lock at its start, so two processes never decide on the same
state: the second waits (up to the busy timeout) and then sees what the first committed. Every change of one
operation happens in one transaction; an exception anywhere inside rolls all of it back.

Rows refer to their parent by numeric id; the id also names the snapshot's directory (``snapshots/<id>``), so
committing (which renames the key) never touches the file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator

from ._errors import FailedPrecondition, SnapshotError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE,
    kind       TEXT    NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
    parent_id  INTEGER REFERENCES snapshots (id) ON DELETE RESTRICT,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels     TEXT    NOT NULL DEFAULT '{}',
    size       INTEGER,
    inodes     INTEGER
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id);
CREATE TABLE IF NOT EXISTS images (
    name                TEXT    PRIMARY KEY,
    manifest_digest     TEXT    NOT NULL,
    manifest_media_type TEXT    NOT NULL,
    config_digest       TEXT    NOT NULL,
    top_id              INTEGER REFERENCES snapshots (id) ON DELETE RESTRICT,
    platform            TEXT    NOT NULL,
    created_ns          INTEGER NOT NULL,
    updated_ns          INTEGER NOT NULL,
    labels              TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS images_top ON images (top_id);
"""

_COLUMNS = "id, key, kind, parent_id, created_ns, updated_ns, labels, size, inodes"


@dataclasses.dataclass(frozen=True)
class Row:
    """One snapshot as stored."""

    id: int
    key: str
    kind: str
    parent_id: int | None
    created_ns: int
    updated_ns: int
    labels: dict[str, str]
    size: int | None
    inodes: int | None


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """One image name as stored: its manifest and config (blobs of the content store) and the committed
    snapshot of its top layer (None for an image without layers)."""

    name: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    top_id: int | None
    platform: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str]


_IMAGE_COLUMNS = ("name, manifest_digest, manifest_media_type, config_digest, top_id, platform, created_ns,"
                  " updated_ns, labels")


def _image_row(values: tuple[object, ...]) -> ImageRow:
    name, manifest, media_type, config, top_id, platform, created, updated, labels = values
    assert isinstance(name, str) and isinstance(manifest, str) and isinstance(media_type, str)
    assert isinstance(config, str) and (top_id is None or isinstance(top_id, int)) and isinstance(platform, str)
    assert isinstance(created, int) and isinstance(updated, int) and isinstance(labels, str)
    decoded = json.loads(labels)
    return ImageRow(name, manifest, media_type, config, top_id, platform, created, updated,
                    {str(k): str(v) for k, v in decoded.items()})


def _row(values: tuple[object, ...]) -> Row:
    sid, key, kind, parent_id, created, updated, labels, size, inodes = values
    assert isinstance(sid, int) and isinstance(key, str) and isinstance(kind, str)
    assert parent_id is None or isinstance(parent_id, int)
    assert isinstance(created, int) and isinstance(updated, int) and isinstance(labels, str)
    assert size is None or isinstance(size, int)
    assert inodes is None or isinstance(inodes, int)
    decoded = json.loads(labels)
    return Row(sid, key, kind, parent_id, created, updated, {str(k): str(v) for k, v in decoded.items()},
               size, inodes)


class Tx:
    """The queries of one transaction (valid only inside :meth:`Store.read` or :meth:`Store.write`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, key: str) -> Row | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,))
        values = cur.fetchone()
        return None if values is None else _row(values)

    def by_id(self, sid: int) -> Row | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (sid,))
        values = cur.fetchone()
        return None if values is None else _row(values)

    def all(self) -> list[Row]:
        return [_row(v) for v in self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY key")]

    def ids(self) -> set[int]:
        return {int(v[0]) for v in self._db.execute("SELECT id FROM snapshots")}

    def children(self, sid: int) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM snapshots WHERE parent_id = ?", (sid,)).fetchone()
        return int(n)

    def child_ids(self, sid: int) -> set[int]:
        return {int(v[0]) for v in self._db.execute("SELECT id FROM snapshots WHERE parent_id = ?", (sid,))}

    def ancestors(self, sid: int) -> list[Row]:
        """The parents of ``sid``, nearest first (``sid`` itself excluded)."""
        cur = self._db.execute(
            f"""WITH RECURSIVE chain(id, depth) AS (
                    SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL
                    UNION ALL
                    SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id
                    WHERE s.parent_id IS NOT NULL)
                SELECT {", ".join("s." + c.strip() for c in _COLUMNS.split(","))}
                FROM chain c JOIN snapshots s ON s.id = c.id ORDER BY c.depth""",
            (sid,),
        )
        return [_row(v) for v in cur]

    def insert(self, key: str, kind: str, parent_id: int | None, labels: dict[str, str],
               size: int | None = None, inodes: int | None = None) -> int:
        now = time.time_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, labels, size, inodes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, kind, parent_id, now, now, _dump(labels), size, inodes),
        )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def commit_active(self, sid: int, name: str, labels: dict[str, str], size: int, inodes: int) -> None:
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = 'committed', created_ns = ?, updated_ns = ?, labels = ?,"
            " size = ?, inodes = ? WHERE id = ? AND kind = 'active'",
            (name, now, now, _dump(labels), size, inodes, sid),
        )

    def set_labels(self, sid: int, labels: dict[str, str]) -> None:
        self._db.execute("UPDATE snapshots SET labels = ?, updated_ns = max(updated_ns + 1, ?) WHERE id = ?",
                         (_dump(labels), time.time_ns(), sid))

    def set_usage(self, sid: int, size: int, inodes: int) -> None:
        self._db.execute("UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?", (size, inodes, sid))

    def delete(self, sid: int) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))

    # -- images --

    def image(self, name: str) -> ImageRow | None:
        cur = self._db.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE name = ?", (name,))
        values = cur.fetchone()
        return None if values is None else _image_row(values)

    def images(self) -> list[ImageRow]:
        return [_image_row(v) for v in self._db.execute(f"SELECT {_IMAGE_COLUMNS} FROM images ORDER BY name")]

    def put_image(self, name: str, manifest_digest: str, manifest_media_type: str, config_digest: str,
                  top_id: int | None, platform: str, labels: dict[str, str]) -> None:
        """Insert the image ``name``, or point an existing name at another image (its creation time stays)."""
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO images (name, manifest_digest, manifest_media_type, config_digest, top_id, platform,"
            " created_ns, updated_ns, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET manifest_digest = excluded.manifest_digest,"
            " manifest_media_type = excluded.manifest_media_type, config_digest = excluded.config_digest,"
            " top_id = excluded.top_id, platform = excluded.platform,"
            " updated_ns = max(images.updated_ns + 1, excluded.updated_ns), labels = excluded.labels",
            (name, manifest_digest, manifest_media_type, config_digest, top_id, platform, now, now, _dump(labels)),
        )

    def delete_image(self, name: str) -> None:
        self._db.execute("DELETE FROM images WHERE name = ?", (name,))

    def images_on(self, ids: set[int]) -> dict[int, list[str]]:
        """For each snapshot id of ``ids``, the names of the images whose chain holds it (top or beneath)."""
        used: dict[int, list[str]] = {}
        for image in self.images():
            if image.top_id is None:
                continue
            chain = {image.top_id, *(a.id for a in self.ancestors(image.top_id))}
            for sid in chain & ids:
                used.setdefault(sid, []).append(image.name)
        return used

    def meta(self, name: str) -> str | None:
        values = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if values is None else str(values[0])

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT INTO meta (name, value) VALUES (?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))

    def integrity(self) -> list[str]:
        """Problems SQLite finds in the database file and its foreign keys (empty when sound)."""
        problems = [str(v[0]) for v in self._db.execute("PRAGMA integrity_check")]
        if problems == ["ok"]:
            problems = []
        for table, rowid, parent, _fk in self._db.execute("PRAGMA foreign_key_check"):
            problems.append(f"row {rowid} of {table} refers to a missing row of {parent}")
        return problems


def _dump(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


class Store:
    """A connection to the metadata database of one snapshot root."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._wal(timeout)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _wal(self, timeout: float) -> None:
        # Switching to WAL needs a moment of exclusive access; a fresh database opened by several processes
        # at once can see SQLITE_BUSY here without the busy handler being consulted, so retry.
        deadline = time.monotonic() + timeout
        while True:
            try:
                (mode,) = self.db.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() == "wal":
                    return
            except sqlite3.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise SnapshotError(f"{self.path}: cannot switch the database to WAL mode (locked)")
            time.sleep(0.01)

    def _migrate(self) -> None:
        (current,) = self.db.execute("PRAGMA user_version").fetchone()
        if current == SCHEMA_VERSION:
            return
        with self.write():
            (version,) = self.db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self.path}: the store has schema version {version}; this unionfs knows {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise FailedPrecondition("the snapshotter is closed")
        return self._db

    def close(self) -> None:
        """Close the connection; closing again does nothing."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        """A transaction holding the write lock from its start; committed on success, rolled back on error."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (after some errors it does)
                db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction: one consistent view of the database, never blocking writers (WAL)."""
        db = self.db
        db.execute("BEGIN")
        try:
            yield Tx(db)
        finally:
            if db.in_transaction:
                db.execute("COMMIT")
