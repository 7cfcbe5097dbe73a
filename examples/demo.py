"""Build a three-layer stack, mount it with unionfs, look around, change things, and unmount."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from unionfs import Stack, XattrFormat
from unionfs.layers import Entry

PY = sys.executable


def build(base: Path, fmt: XattrFormat) -> dict[str, Path]:
    d = {name: base / name for name in ("base", "middle", "top", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    # bottom layer: a tiny "distribution"
    (d["base"] / "etc").mkdir()
    (d["base"] / "etc/os-release").write_text("NAME=demo\nVERSION=1\n")
    (d["base"] / "etc/motd").write_text("welcome (from base)\n")
    (d["base"] / "var/cache/apt").mkdir(parents=True)
    (d["base"] / "var/cache/apt/pkgcache.bin").write_text("x" * 1000)
    (d["base"] / "usr/bin").mkdir(parents=True)
    (d["base"] / "usr/bin/tool").write_text("#!/bin/sh\necho tool v1\n")
    (d["base"] / "usr/bin/tool").chmod(0o755)
    # middle layer: upgrades the tool, deletes the motd (whiteout), empties the apt cache (opaque dir)
    (d["middle"] / "usr/bin").mkdir(parents=True)
    (d["middle"] / "usr/bin/tool").write_text("#!/bin/sh\necho tool v2\n")
    (d["middle"] / "usr/bin/tool").chmod(0o755)
    (d["middle"] / "etc").mkdir()
    os.mknod(d["middle"] / "etc/motd", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (d["middle"] / "var/cache/apt").mkdir(parents=True)
    os.setxattr(d["middle"] / "var/cache/apt", fmt.opaque, b"y")
    # top layer: the application
    (d["top"] / "app").mkdir()
    (d["top"] / "app/config.ini").write_text("[app]\ncolor = blue\n")
    (d["top"] / "app/current").symlink_to("config.ini")
    return d


def show_tree(stack: Stack, names: list[str]) -> None:
    """The merged tree, each entry with the layer it comes from."""

    def walk(entry: Entry, depth: int) -> None:
        for name in sorted(stack.listdir(entry)):
            child = stack.lookup(entry, name)
            assert child is not None
            label = names[child.layer]
            extra = ""
            if child.is_dir and len(child.dirs) > 1:
                label = "+".join(names[i] for i in child.dirs)
                extra = " (merged)"
            elif child.is_dir and child.opaque:
                extra = " (opaque: lower layers hidden)"
            print(f"  {'  ' * depth}{name.decode()}{'/' if child.is_dir else ''}  <- {label}{extra}")
            if child.is_dir:
                walk(child, depth + 1)

    walk(stack.root(), 0)


def listing(root: Path) -> list[tuple[str, int, int]]:
    """(path, file type, size) of everything under ``root``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out.append((str(p.relative_to(root)), stat.S_IFMT(st.st_mode), st.st_size if p.is_file() else 0))
    return sorted(out)


def kernel_view(opts: str, mnt: Path, seen: list[tuple[str, int, int]], tmp: str) -> None:
    """Mount the same layers, upper directory included, with kernel overlayfs and compare the views."""
    if os.geteuid() != 0:
        print("\n(As root, the demo would now mount the same layers with kernel overlayfs and compare.)")
        return
    print("\nThe same layers and upper directory under kernel overlayfs:")
    print("$ mount -t overlay overlay -o " + opts.replace(tmp, "$T") + " $T/merged")
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  (kernel overlayfs is not available here: {done.stderr.strip()})")
        return
    try:
        print("  the kernel shows the same tree as unionfs did:", listing(mnt) == seen)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def run(*args: str) -> None:
    subprocess.run([PY, "-m", "unionfs", *args], check=True)


def main() -> int:
    fmt = XattrFormat.TRUSTED if os.geteuid() == 0 else XattrFormat.USER
    with tempfile.TemporaryDirectory(prefix="unionfs-demo-") as tmp:
        d = build(Path(tmp), fmt)
        lowers = ":".join(str(d[n]) for n in ("top", "middle", "base"))
        opts = f"lowerdir={lowers},upperdir={d['upper']},workdir={d['work']}"
        if fmt is XattrFormat.USER:
            opts += ",userxattr"
        print(f"Layers (top first): upper, top, middle, base under {tmp}")
        print("middle deletes etc/motd (whiteout) and hides the apt cache (opaque directory).\n")
        print("$ unionfs mount -o " + opts.replace(tmp, "$T") + " $T/merged")
        run("mount", "-o", opts, str(d["merged"]))
        m = d["merged"]
        try:
            print("\nThe merged tree, with the layer each entry comes from:")
            layer_dirs = [d[n] for n in ("upper", "top", "middle", "base")]
            stack = Stack([os.fsencode(p) for p in layer_dirs], True, fmt)
            try:
                show_tree(stack, ["upper", "top", "middle", "base"])
            finally:
                stack.close()
            print("\n$ ls -la merged/etc")
            subprocess.run(["ls", "-la", str(m / "etc")], check=True)
            print("$ merged/usr/bin/tool")
            subprocess.run([str(m / "usr/bin/tool")], check=True)

            print("\nChanging things: edit a lower file (copy-up), delete one, make a new directory.")
            with open(m / "app/config.ini", "a") as f:
                f.write("size = large\n")
            (m / "etc/os-release").unlink()
            (m / "logs").mkdir()
            (m / "logs/app.log").write_text("started\n")
            print("$ cat merged/app/config.ini")
            print((m / "app/config.ini").read_text(), end="")
            print("\nWhat landed in the upper layer (the kernel's format):")
            for p in sorted(d["upper"].rglob("*")):
                st = p.lstat()
                rel = p.relative_to(d["upper"])
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    kind = "whiteout (char device 0/0)"
                elif stat.S_ISDIR(st.st_mode):
                    kind = "directory"
                else:
                    kind = f"file, {st.st_size} bytes"
                print(f"  {rel}: {kind}")
            print("\nThe base layer is untouched:", (d["base"] / "etc/os-release").exists())
            seen = listing(m)
        finally:
            print("\n$ unionfs umount $T/merged")
            run("umount", str(m))
        kernel_view(opts, m, seen, tmp)
    print("Done: the demo folder has been removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
