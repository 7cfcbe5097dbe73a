"""One client of the concurrency test (test_kernel_concurrency.py), run as its own process on a mount.

``python concurrency_worker.py worker SPEC OUT``: a seeded random mix of operations, mostly on the worker's own
names (``w<N>/...`` and ``s/a/w<N>-*``, ``s/b/w<N>-*``, which no other client touches) and some on shared lower
files that every worker copies up (``chmod``, ``setxattr``, ``link``), reads, lists or unlinks.  The worker keeps
an exact model of its own names (type, content, which names share an inode): every result of an operation on
them is checked against what the model says the kernel would do (success, or one of the errnos that apply), and
the final model is written to OUT for the test to compare with the merged views.

``python concurrency_worker.py reader SPEC OUT``: walks the whole tree (``listdir``, ``lstat``, reading every
regular file) until the stop file named in SPEC exists, checking that files whose content nobody changes read
back exactly, and that every error is one a racing walk may meet.

Only the standard library is used: this runs under whatever interpreter runs the tests.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat
import sys
import time
from typing import Any

#: Errors a walk of a tree that others change may meet: the name went away, or a directory became a file.
WALK_ERRNOS = {"ENOENT", "ENOTDIR"}


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class Inode:
    __slots__ = ("content", "foreign", "ident")

    def __init__(self, ident: int, content: bytes, foreign: bool = False) -> None:
        self.ident = ident
        self.content = content
        #: also linked from a shared name (others chmod it; nobody may write it)
        self.foreign = foreign


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.root: str = spec["root"]
        self.wid: int = spec["id"]
        self.rng = random.Random(spec["seed"])
        self.nops: int = spec["ops"]
        self.stable: dict[str, bytes] = {p: bytes.fromhex(c) for p, c in spec["stable"].items()}
        self.shared_files: list[str] = spec["shared_files"]
        self.doomed: list[str] = spec["doomed"]
        self.shared_dirs: list[str] = spec["shared_dirs"]
        self.pool: list[str] = spec["pool"]
        self.own_re = re.compile(rf"(w{self.wid}/|s/[ab]/w{self.wid}-)")
        self._ids = 0
        #: own path -> an Inode, "ldir" (a directory from a lower layer, perhaps merged) or "dir" (one made on
        #: the mount: a pure upper directory)
        self.model: dict[str, Inode | str] = {}
        for path, entry in spec["initial"].items():
            self.model[path] = "ldir" if entry is None else self._new(bytes.fromhex(entry))
        self.violations: list[str] = []
        #: the Inode of each shared file linked to own names
        self.foreign: dict[str, Inode] = {}
        #: every operation done and its outcome, for the messages
        self.history: list[str] = []
        self.outcomes: dict[str, int] = {}

    def _new(self, content: bytes, foreign: bool = False) -> Inode:
        self._ids += 1
        return Inode(self._ids, content, foreign)

    def abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    # -- the model

    def kind(self, p: str) -> str | None:
        v = self.model.get(p)
        return None if v is None else "file" if isinstance(v, Inode) else "dir"

    def lookup_errs(self, p: str) -> set[str]:
        """Errors resolving the parent of ``p``: a missing ancestor, or one that is a file."""
        parts = p.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if not self.own_re.match(anc):
                continue  # w<N> itself, s, s/a, s/b: always there
            k = self.kind(anc)
            if k is None:
                return {"ENOENT"}
            if k == "file":
                return {"ENOTDIR"}
        return set()

    def children(self, p: str) -> list[str]:
        pre = p + "/"
        return sorted(q[len(pre):] for q in self.model if q.startswith(pre) and "/" not in q[len(pre):])

    def nlink(self, ino: Inode) -> int:
        return sum(1 for v in self.model.values() if v is ino)

    # -- operations

    def recent(self, *paths: str) -> str:
        """The operations that named one of ``paths`` or a directory above one, the last ones."""
        names = {"/".join(p.split("/")[:j]) for p in paths for j in range(2, len(p.split("/")) + 1)}
        hits = [h for h in self.history[:-1] if any(f"'{n}'" in h for n in names)]
        return "its history: " + "; ".join(hits[-12:])

    def pick_own(self) -> str:
        return self.rng.choice(self.pool)

    def data(self) -> bytes:
        n = self.rng.choice([0, 1, 5, 17, 100, 1000, 5000])
        return self.rng.randbytes(n)

    def record(self, what: str, outcome: str, allowed: set[str], ok_allowed: bool) -> bool:
        """Check ``outcome`` ("ok" or an errno name) of ``what``; True if it succeeded."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.history.append(f"{what} -> {outcome}")
        good = (outcome == "ok" and ok_allowed) or outcome in allowed
        if not good:
            expect = (["ok"] if ok_allowed else []) + sorted(allowed)
            named = what.split("'")[1::2]
            self.violations.append(f"worker {self.wid}: {what}: got {outcome}, expected {' or '.join(expect)}; "
                                   f"{self.recent(*named)}")
        return outcome == "ok"

    def attempt(self, fn: Any) -> tuple[str, Any]:
        try:
            return "ok", fn()
        except OSError as exc:
            return errname(exc), None

    def own_op(self) -> None:
        op = self.rng.choices(
            ["create", "write", "append", "truncate", "rename", "link", "unlink", "mkdir", "rmdir", "chmod",
             "setxattr", "listdir", "read"],
            weights=[10, 6, 6, 4, 12, 5, 7, 8, 5, 3, 3, 4, 6])[0]
        p = self.pick_own()
        a = self.abs(p)
        k = self.kind(p)
        errs = self.lookup_errs(p)
        v = self.model.get(p)
        if op in ("create", "write", "append", "truncate") and isinstance(v, Inode) and v.foreign:
            op = "read"  # the shared file's content must stay as it is
        what = f"{op}({p!r})"
        if op == "create":
            data = self.data()
            if not errs and k == "dir":
                errs = {"EISDIR"}

            def create() -> None:
                fd = os.open(a, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            if self.record(what, self.attempt(create)[0], errs, not errs):
                if isinstance(v, Inode):
                    v.content = data
                else:
                    self.model[p] = self._new(data)
        elif op in ("write", "append", "truncate", "read"):
            if not errs:
                errs = {"ENOENT"} if k is None else {"EISDIR"} if k == "dir" else set()
            if op == "write":
                off = self.rng.randrange(0, 3000)
                data = self.data()

                def write() -> None:
                    fd = os.open(a, os.O_WRONLY)
                    try:
                        os.pwrite(fd, data, off)
                    finally:
                        os.close(fd)
                if self.record(what, self.attempt(write)[0], errs, not errs) and isinstance(v, Inode) and data:
                    c = v.content  # (writing nothing past the end does not extend a file)
                    if len(c) < off:
                        c += bytes(off - len(c))
                    v.content = c[:off] + data + c[off + len(data):]
            elif op == "append":
                data = self.data()

                def append() -> None:
                    fd = os.open(a, os.O_WRONLY | os.O_APPEND)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                if self.record(what, self.attempt(append)[0], errs, not errs) and isinstance(v, Inode):
                    v.content += data
            elif op == "truncate":
                size = self.rng.choice([0, 3, 100, 2000, 9000])
                if self.record(what, self.attempt(lambda: os.truncate(a, size))[0], errs, not errs) \
                        and isinstance(v, Inode):
                    v.content = v.content[:size] + bytes(max(0, size - len(v.content)))
            else:
                def read() -> bytes:
                    with open(a, "rb") as f:
                        return f.read()
                outcome, got = self.attempt(read)
                if self.record(what, outcome, errs, not errs) and isinstance(v, Inode) and got != v.content:
                    self.violations.append(f"worker {self.wid}: {what}: read {len(got)} bytes that differ from the "
                                           f"{len(v.content)} bytes written; {self.recent(p)}")
        elif op == "unlink":
            if not errs:
                errs = {"ENOENT"} if k is None else {"EISDIR"} if k == "dir" else set()
            if self.record(what, self.attempt(lambda: os.unlink(a))[0], errs, not errs):
                self.model.pop(p, None)  # (gone even where it should not have been there: reported above)
        elif op == "mkdir":
            if not errs and k is not None:
                errs = {"EEXIST"}
            if self.record(what, self.attempt(lambda: os.mkdir(a, 0o755))[0], errs, not errs):
                self.model[p] = "dir"
        elif op == "rmdir":
            if not errs:
                errs = ({"ENOENT"} if k is None else {"ENOTDIR"} if k == "file"
                        else {"ENOTEMPTY"} if self.children(p) else set())
            if self.record(what, self.attempt(lambda: os.rmdir(a))[0], errs, not errs):
                self.model.pop(p, None)
        elif op in ("chmod", "setxattr", "listdir"):
            if not errs and k is None:
                errs = {"ENOENT"}
            if op == "chmod":
                mode = self.rng.choice([0o600, 0o644, 0o755, 0o700])
                self.record(what, self.attempt(lambda: os.chmod(a, mode))[0], errs, not errs)
            elif op == "setxattr":
                val = self.rng.randbytes(self.rng.randrange(0, 40))
                self.record(what, self.attempt(lambda: os.setxattr(a, f"user.w{self.wid}", val))[0], errs,
                            not errs)
            else:
                if not errs and k == "file":
                    errs = {"ENOTDIR"}
                outcome, got = self.attempt(lambda: sorted(os.listdir(a)))
                if self.record(what, outcome, errs, not errs) and got != self.children(p):
                    self.violations.append(f"worker {self.wid}: {what}: listed {got}, expected {self.children(p)}")
        elif op == "link":
            q = self.pick_own()
            what = f"link({p!r}, {q!r})"
            if not errs and k is None:
                errs = {"ENOENT"}
            errs |= self.lookup_errs(q)
            if self.kind(q) is not None:
                errs.add("EEXIST")
            if k == "dir":
                errs.add("EPERM")
            if self.record(what, self.attempt(lambda: os.link(a, self.abs(q)))[0], errs, not errs) and v is not None:
                self.model[q] = v
        elif op == "rename":
            q = self.pick_own()
            self.rename(p, q)

    def rename(self, p: str, q: str) -> None:
        what = f"rename({p!r}, {q!r})"
        k, kq = self.kind(p), self.kind(q)
        errs = self.lookup_errs(p)
        if not errs and k is None:
            errs = {"ENOENT"}
        errs |= self.lookup_errs(q)
        exdev = False
        noop = False
        if not errs and k is not None:
            if p == q or (k == "file" and self.model[p] is self.model.get(q)):
                noop = True
            elif k == "dir":
                if q.startswith(p + "/"):
                    errs.add("EINVAL")
                elif p.startswith(q + "/"):
                    errs.add("ENOTEMPTY")  # the target is an ancestor of the source
                elif kq == "file":
                    errs.add("ENOTDIR")
                elif kq == "dir" and self.children(q):
                    # the overlay refuses to move a lower directory before it looks at the target
                    errs |= {"ENOTEMPTY", "EEXIST"} | ({"EXDEV"} if self.model[p] == "ldir" else set())
                elif self.model[p] == "ldir":
                    exdev = True  # a directory from a lower layer cannot move without redirects
            elif p.startswith(q + "/"):
                errs.add("ENOTEMPTY")
            elif kq == "dir":
                errs.add("EISDIR")
        if exdev:
            errs = {"EXDEV"}
        outcome = self.attempt(lambda: os.rename(self.abs(p), self.abs(q)))[0]
        if self.record(what, outcome, errs, not errs) and not noop:
            pre = p + "/"
            moved = {q + name[len(p):]: v for name, v in self.model.items() if name == p or name.startswith(pre)}
            for name in [n for n in self.model if n in (p, q) or n.startswith(pre)]:
                del self.model[name]
            self.model.update(moved)

    def shared_op(self) -> None:
        op = self.rng.choices(["read", "chmod", "setxattr", "dirxattr", "listdir", "link", "unlink_doomed",
                               "read_doomed"], weights=[6, 4, 4, 2, 3, 3, 2, 3])[0]
        if op in ("read", "chmod", "setxattr", "link"):
            p = self.rng.choice(self.shared_files)
        elif op == "dirxattr" or op == "listdir":
            p = self.rng.choice(self.shared_dirs)
        else:
            p = self.rng.choice(self.doomed)
        a = self.abs(p)
        what = f"{op}({p!r})"
        doomed = op.endswith("_doomed")
        allowed = {"ENOENT"} if doomed else set()
        if op in ("read", "read_doomed"):
            def read() -> bytes:
                with open(a, "rb") as f:
                    return f.read()
            outcome, got = self.attempt(read)
            if self.record(what, outcome, allowed, True) and got != self.stable[p]:
                self.violations.append(f"worker {self.wid}: {what}: read {got[:40]!r}..., not the lower file's "
                                       f"{self.stable[p][:40]!r}...")
        elif op == "chmod":
            self.record(what, self.attempt(lambda: os.chmod(a, self.rng.choice([0o644, 0o600, 0o640])))[0],
                        allowed, True)
        elif op in ("setxattr", "dirxattr"):
            val = self.rng.randbytes(self.rng.randrange(1, 30))
            self.record(what, self.attempt(lambda: os.setxattr(a, f"user.w{self.wid}", val))[0], allowed, True)
        elif op == "listdir":
            self.record(what, self.attempt(lambda: os.listdir(a))[0], allowed, True)
        elif op == "unlink_doomed":
            self.record(what, self.attempt(lambda: os.unlink(a))[0], allowed, True)
        elif op == "link":
            q = self.rng.choice([n for n in self.pool if n.startswith("s/")])
            what = f"link({p!r}, {q!r})"
            errs = self.lookup_errs(q) | ({"EEXIST"} if self.kind(q) is not None else set())
            if self.record(what, self.attempt(lambda: os.link(a, self.abs(q)))[0], errs, not errs):
                # one Inode for each shared file, however many times it is linked: a rename between two of
                # its names does nothing
                ino = self.foreign.get(p)
                if ino is None:
                    ino = self.foreign[p] = self._new(self.stable[p], foreign=True)
                self.model[q] = ino

    def run(self) -> dict[str, Any]:
        for _ in range(self.nops):
            if self.rng.random() < 0.8:
                self.own_op()
            else:
                self.shared_op()
        final: dict[str, Any] = {}
        for p, v in self.model.items():
            if isinstance(v, Inode):
                final[p] = {"type": "file", "content": v.content.hex(), "inode": v.ident, "foreign": v.foreign,
                            "nlink": self.nlink(v)}
            else:
                final[p] = {"type": "dir", "children": self.children(p)}
        return {"violations": self.violations, "outcomes": self.outcomes, "model": final}


def read_walk(spec: dict[str, Any]) -> dict[str, Any]:
    root = spec["root"]
    stable = {p: bytes.fromhex(c) for p, c in spec["stable"].items()}
    stop = spec["stop"]
    violations: list[str] = []
    walks = files = 0
    rid = spec["id"]

    def bad(what: str, exc: OSError, allowed: set[str]) -> None:
        if errname(exc) not in allowed:
            violations.append(f"reader {rid}: {what}: {errname(exc)}")

    while True:
        stop_now = os.path.exists(stop)
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                names = os.listdir(os.path.join(root, rel) if rel else root)
            except OSError as exc:
                bad(f"listdir({rel!r})", exc, WALK_ERRNOS)
                continue
            for name in names:
                r = f"{rel}/{name}" if rel else name
                a = os.path.join(root, r)
                try:
                    st = os.lstat(a)
                except OSError as exc:
                    bad(f"lstat({r!r})", exc, WALK_ERRNOS)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    try:
                        fd = os.open(a, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                    except OSError as exc:
                        # replaced by a directory or a symlink meanwhile
                        bad(f"open({r!r})", exc, WALK_ERRNOS | {"EISDIR", "ELOOP"})
                        continue
                    try:
                        chunks = []
                        while chunk := os.read(fd, 1 << 16):
                            chunks.append(chunk)
                    except OSError as exc:
                        bad(f"read({r!r})", exc, set())
                        continue
                    finally:
                        os.close(fd)
                    data = b"".join(chunks)
                    if r in stable and data != stable[r]:
                        violations.append(f"reader {rid}: {r!r} read {len(data)} bytes, not the lower file's "
                                          f"{len(stable[r])}")
        walks += 1
        if stop_now or len(violations) > 50:
            break
        time.sleep(0.01)
    return {"violations": violations, "walks": walks, "files": files}


def main() -> None:
    role, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    result = Worker(spec).run() if role == "worker" else read_walk(spec)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.rename(tmp, out_path)


if __name__ == "__main__":
    main()
