"""A walk through the union rules of overlayfs on a small stack, with the commands that make them visible:
``unionfs tree --all``, ``unionfs inspect``, the virtual xattr ``user.unionfs.layer``, ``unionfs layers`` and
``-o trace=FILE``. Builds three layers in a temporary directory, mounts them (as root or as an ordinary user),
and unmounts and removes everything at the end."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
#: the project (its ``unionfs`` package is the one the commands run)
ROOT = Path(__file__).resolve().parents[1]
LAYER_XATTR = "user.unionfs.layer"


def build(base: Path, opaque_xattr: str) -> dict[str, Path]:
    """Three layers, top first: app, update, base; plus upper, work and the mount point."""
    d = {name: base / name for name in ("app", "update", "base", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    b, u, a = d["base"], d["update"], d["app"]
    # base: a tiny system
    (b / "etc").mkdir()
    (b / "etc/hostname").write_text("base\n")
    (b / "etc/motd").write_text("welcome to base\n")
    (b / "var/cache").mkdir(parents=True)
    (b / "var/cache/old.pkg").write_text("x" * 100)
    (b / "share/doc").mkdir(parents=True)
    (b / "share/doc/README").write_text("the base's documentation\n")
    # update: a new hostname (shadows base's), no motd (a whiteout), a fresh cache (an opaque directory)
    (u / "etc").mkdir()
    (u / "etc/hostname").write_text("updated\n")
    os.mknod(u / "etc/motd", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (u / "var/cache").mkdir(parents=True)
    (u / "var/cache/new.pkg").write_text("y" * 10)
    os.setxattr(u / "var/cache", opaque_xattr, b"y")
    # app: its config, and a document merging into base's share/doc
    (a / "etc").mkdir()
    (a / "etc/app.conf").write_text("colour = blue\n")
    (a / "share/doc").mkdir(parents=True)
    (a / "share/doc/APP").write_text("the app's documentation\n")
    return d


class Tutorial:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp

    def shown(self, text: str) -> str:
        return text.replace(self.tmp, "$T")

    def say(self, text: str) -> None:
        print(f"\n== {text}")

    def command(self, *args: str | Path) -> None:
        """Run ``unionfs ARGS...``, printing the command line and its output (paths under $T)."""
        argv = [str(a) for a in args]
        print("$ unionfs " + self.shown(" ".join(argv)))
        done = subprocess.run([PY, "-m", "unionfs", *argv], capture_output=True, text=True, cwd=ROOT, check=False)
        print(self.shown(done.stdout), end="")
        if done.returncode != 0:
            raise SystemExit(f"unionfs {argv[0]} failed ({done.returncode}): {done.stderr.strip()}")


def main() -> int:
    rootless = os.geteuid() != 0
    prefix = "user" if rootless else "trusted"
    with tempfile.TemporaryDirectory(prefix="unionfs-tutorial-") as tmp:
        t = Tutorial(tmp)
        d = build(Path(tmp), f"{prefix}.overlay.opaque")
        m = d["merged"]
        trace = Path(tmp) / "trace.log"
        lowers = ":".join(str(d[n]) for n in ("app", "update", "base"))
        opts = f"lowerdir={lowers},upperdir={d['upper']},workdir={d['work']},trace={trace}"
        if rootless:
            opts += ",userxattr"
        print(f"Three layers under $T={tmp}, top first: app, update, base; an empty upper layer on top.")
        print("update replaces etc/hostname, deletes etc/motd (a whiteout) and empties var/cache (an opaque "
              "directory).")
        t.say("Mount them" + (" (as an ordinary user: markers in user.overlay.*, -o userxattr)" if rootless else ""))
        t.command("mount", "-o", opts, m)
        try:
            t.say("The merged tree. Rule: the uppermost layer holding a name shows it; directories of one name "
                  "merge.\n   With --all, what is hidden: a whiteout hides the name beneath it, an opaque "
                  "directory hides the layers beneath it.")
            t.command("tree", "--all", m)

            t.say("Where etc/hostname comes from. Rule: a non-directory of an upper layer shadows the lower "
                  "copies; the first change copies it up.")
            t.command("inspect", m / "etc/hostname")
            with open(m / "etc/hostname", "a") as f:
                f.write("and changed\n")
            print("$ echo 'and changed' >> merged/etc/hostname")
            t.say("After the write: the file was copied up into the upper layer, which now shadows every lower "
                  "copy.")
            t.command("inspect", m / "etc/hostname")
            t.command("tree", m, "etc")

            t.say("Any process can ask the mount which layer an entry comes from (a read-only virtual xattr).")
            getfattr = shutil.which("getfattr")
            for rel in ("etc/hostname", "etc/app.conf", "share/doc/README"):
                if getfattr is not None:
                    print(f"$ getfattr --only-values -n {LAYER_XATTR} merged/{rel}")
                    done = subprocess.run([getfattr, "--only-values", "-n", LAYER_XATTR, str(m / rel)],
                                          capture_output=True, text=True, check=True)
                    print(t.shown(done.stdout))
                else:
                    print(f"$ python3 -c 'import os; print(os.getxattr(\"merged/{rel}\", \"{LAYER_XATTR}\"))'")
                    print(t.shown(os.getxattr(m / rel, LAYER_XATTR).decode()))

            t.say("Rename a merged directory. Rule: without redirect_dir, a directory not wholly in the upper "
                  "layer cannot be moved: rename(2) fails with EXDEV (mv then copies it).")
            print("$ rename merged/share/doc merged/share/manual")
            try:
                os.rename(m / "share/doc", m / "share/manual")
            except OSError as exc:
                print(f"rename: {errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc.strerror})")
            else:  # pragma: no cover - would be a bug
                print("rename: done (unexpected)")

            t.say("A whited-out name is in no listing, and looking it up finds nothing.")
            print("$ ls merged/etc\n" + "  ".join(sorted(os.listdir(m / "etc"))))
            print(f"$ stat merged/etc/motd\n{'exists' if os.path.lexists(m / 'etc/motd') else 'ENOENT'}")

            t.say("What each layer adds, modifies and removes, the upper layer included.")
            t.command("layers", m)
        finally:
            t.say("Unmount")
            t.command("umount", m)
        t.say("The trace (-o trace=FILE): a line for each union decision of the server, with the overlayfs rule "
              "that made it (lookups the kernel had cached leave no line).")
        wanted = ("whited out", "copy-up", "EXDEV", "merged directory", "opaque")
        for line in trace.read_text().splitlines():
            if any(w in line for w in wanted):
                print(t.shown(line))
        t.say("The upper layer holds the copied-up file only; the lower layers are untouched.")
        for p in sorted(d["upper"].rglob("*")):
            print(f"  upper/{p.relative_to(d['upper'])}{'/' if p.is_dir() else ''}")
        print(f"  base/etc/hostname still reads: {(d['base'] / 'etc/hostname').read_text().strip()!r}")
    print("\nDone: the tutorial's folder has been removed.")
    return 0


if __name__ == "__main__":
    if shutil.which("fusermount3") is None:
        sys.exit("the tutorial needs fusermount3 (tests/setup.sh installs it)")
    sys.exit(main())
