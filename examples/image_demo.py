"""The container-image workflow end to end, with no network: build a two-layer OCI image around Debian's static
busybox, import it into a private store, mount it writable, run a shell in it, commit what the shell changed as
a third layer, export the result as an OCI archive, and mount that image read-only to see the change.

Run as root or as an ordinary user (who runs the shell inside `unshare -r`, a user namespace mapping root to
them). Everything lives in one temporary directory, unmounted and removed at the end, also on error.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "id", "uname", "rm", "touch", "mkdir", "env", "test", "[")
REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}

# What the shell inside the writable mount does, and what it runs inside the committed image afterwards.
CHANGE = """
    cat /etc/os-release /etc/motd
    echo "hello from inside the image" > /hello
    rm /etc/motd
    id
    uname -sm
    ls /etc"""
LOOK = """
    cat /hello
    ls /etc
    test -e /etc/motd && echo "/etc/motd is still there" || echo "/etc/motd is gone"
    touch /new || true"""


class DemoError(Exception):
    """Ends the demo with one line on stderr."""


# -- building the image ----------------------------------------------------------------------------------------


def static_busybox() -> bytes:
    """The bytes of /bin/busybox, refused unless it is a statically linked ELF (no PT_INTERP program header)."""
    need = f"{BUSYBOX} must be the statically linked busybox of Debian's package busybox-static"
    try:
        data = BUSYBOX.read_bytes()
    except OSError as exc:
        raise DemoError(f"{need} ({exc.strerror}): apt-get install busybox-static") from None
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise DemoError(f"{need} (it is not an ELF file): apt-get install busybox-static")
    bits64, endian = data[4] == 2, "<" if data[5] == 1 else ">"
    # e_phoff, e_phentsize and e_phnum: where the program headers are, how large, how many
    phoff = struct.unpack_from(endian + ("Q" if bits64 else "I"), data, 0x20 if bits64 else 0x1C)[0]
    phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36 if bits64 else 0x2A)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: it needs a dynamic loader, which the image does not have
            raise DemoError(f"{need} (this one is dynamically linked): apt-get install busybox-static")
    return data


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
          target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, len(data), target
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info, data


def layer_tar(entries: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def base_layer(busybox: bytes) -> bytes:
    """busybox and its applets as symlinks, users and groups, a sticky /tmp, /root."""
    return layer_tar([
        entry("bin/", tarfile.DIRTYPE, mode=0o755),
        entry("bin/busybox", data=busybox, mode=0o755),
        *(entry(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, target="busybox") for applet in APPLETS),
        entry("etc/", tarfile.DIRTYPE, mode=0o755),
        entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        entry("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n"),
        entry("etc/os-release", data=b'NAME="busybox demo"\nID=busybox-demo\nVERSION_ID=1\n'),
        entry("etc/issue", data=b"busybox demo, base layer\n"),
        entry("root/", tarfile.DIRTYPE, mode=0o700),
        entry("tmp/", tarfile.DIRTYPE, mode=0o1777),
    ])


def second_layer() -> bytes:
    """A message of the day, and a whiteout (.wh.NAME) deleting the base layer's etc/issue."""
    return layer_tar([
        entry("etc/", tarfile.DIRTYPE, mode=0o755),
        entry("etc/motd", data=b"Welcome to the busybox demo (second layer).\n"),
        entry("etc/.wh.issue"),
    ])


def write_blob(layout: Path, data: bytes) -> dict[str, object]:
    """Store ``data`` under blobs/sha256/ and return the digest and size of its descriptor."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_image(layout: Path, ref: str, busybox: bytes) -> None:
    """An OCI image layout at ``layout``: two gzip layers, a config, a manifest, and index.json naming it."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    layers, diff_ids = [], []
    for tar in (base_layer(busybox), second_layer()):
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())  # the digest of the uncompressed tar
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       **write_blob(layout, gzip.compress(tar, mtime=0))})
    created = "1970-01-01T00:00:00Z"
    config = {
        "architecture": GOARCH.get(platform.machine(), platform.machine()), "os": "linux", "created": created,
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": "busybox, its applets, /etc, /root, /tmp"},
                    {"created": created, "created_by": "add /etc/motd, delete /etc/issue"}],
    }
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **write_blob(layout, json.dumps(config).encode())},
        "layers": layers,
    }
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], **write_blob(layout, json.dumps(manifest).encode()),
                       "annotations": {"org.opencontainers.image.ref.name": ref}}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


# -- running things --------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = tmp / "store"
        self.mounted: list[Path] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                             os.environ.get("PYTHONPATH")])))

    def show(self, argv: Sequence[str]) -> str:
        """``argv`` as a user would type it, with $T for the temporary directory."""
        words = [a if a and all(c.isalnum() or c in "-_./:=@$" for c in a) else f"'{a}'" for a in argv]
        return " ".join(words).replace(str(self.tmp), "$T")

    def run(self, argv: Sequence[str], shown: Sequence[str] | None = None, env: dict[str, str] | None = None,
            merged: bool = False) -> str:
        """Print the command, run it, print its output indented (its stderr first, or ``merged`` into its stdout
        in the order written); its stdout is returned."""
        print(f"$ {self.show(shown or argv)}", flush=True)
        stderr = subprocess.STDOUT if merged else subprocess.PIPE
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env or self.env,
                              stdin=subprocess.DEVNULL, timeout=120)
        output = (done.stderr or "") + done.stdout
        for line in output.splitlines():
            print(f"  {line}".replace(str(self.tmp), "$T"))
        if done.returncode != 0:
            last = (output.strip().splitlines() if merged else done.stderr.strip().splitlines()) or [
                f"exit status {done.returncode}"]
            raise DemoError(f"{self.show(shown or argv)} failed: {last[-1]}".replace(str(self.tmp), "$T"))
        return done.stdout

    def unionfs(self, *args: str) -> str:
        return self.run([sys.executable, "-m", "unionfs", *args], ["unionfs", *args])

    def image(self, verb: str, *args: str) -> str:
        return self.unionfs("image", verb, "--root", str(self.store), *args)

    def mount(self, ref: str, mnt: Path, *extra: str) -> str:
        mnt.mkdir(exist_ok=True)
        self.mounted.append(mnt)
        return self.image("mount", ref, str(mnt), *extra).strip()

    def umount(self, mnt: Path) -> None:
        self.unionfs("umount", str(mnt))
        self.mounted.remove(mnt)

    def shell(self, mnt: Path, script: str) -> str:
        """Run ``script`` with the image's /bin/sh, chrooted into ``mnt``: as root directly, as an ordinary user in
        a user namespace where they are root (`unshare -r`), which lets them chroot."""
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
        chroot, unshare = shutil.which("chroot", path=path), shutil.which("unshare", path=path)
        if chroot is None or (not ROOT and unshare is None):
            raise DemoError("chroot and unshare are needed: apt-get install coreutils util-linux")
        argv = [chroot, str(mnt), "/bin/sh", "-c", script]
        shown = ["chroot", str(mnt), "/bin/sh", "-c", script]
        if not ROOT:
            assert unshare is not None
            argv, shown = [unshare, "-r", *argv], ["unshare", "-r", *shown]
        return self.run(argv, shown, env={"PATH": "/bin", "HOME": "/root", "LANG": "C"}, merged=True)

    def cleanup(self) -> None:
        """Unmount whatever is still mounted (lazily if need be), then remove the temporary directory."""
        for mnt in reversed(self.mounted):
            if is_mounted(mnt):
                subprocess.run([sys.executable, "-m", "unionfs", "umount", str(mnt)], env=self.env,
                               capture_output=True, timeout=60)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=60)
        left = [str(m) for m in self.mounted if is_mounted(m)]
        if left:
            print(f"image-demo: still mounted, not removing {self.tmp}: {' '.join(left)}", file=sys.stderr)
            return
        try:
            shutil.rmtree(self.tmp)
        except OSError as exc:
            print(f"image-demo: could not remove {self.tmp}: {exc}", file=sys.stderr)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path`` (read from /proc/self/mountinfo, which escapes blanks octally)."""
    target = os.path.realpath(path)
    for c in "\\ \t\n":
        target = target.replace(c, f"\\{ord(c):03o}")
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == target for line in f)


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


# -- the demo --------------------------------------------------------------------------------------------------


def demo(d: Demo) -> None:
    busybox = static_busybox()
    if ROOT:
        print("Running as root. An ordinary user runs the same unionfs commands; the differences are noted.")
    else:
        print(f"Running as uid {os.getuid()}, an ordinary user: no privilege is needed for any of this.")

    say("Building a two-layer OCI image layout from /bin/busybox (tarfile, gzip, sha256, JSON; see build_image)")
    layout = d.tmp / "layout"
    build_image(layout, "demo:1", busybox)
    for p in sorted(layout.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(d.tmp)}  ({p.stat().st_size} bytes)")

    say("Importing it into a private store (--root): each layer becomes a committed snapshot named by its chain ID")
    if ROOT:
        print("(As root, the store keeps the owners and modes of the layers on disk; an ordinary user's store records\n"
              " those it cannot keep in the xattr user.containers.override_stat, and its mounts show them.)")
    else:
        print("(The owners the layers give, root here, are recorded in the xattr user.containers.override_stat:\n"
              " an ordinary user cannot give files to root. Mounts show them, root's files as yours.)")
    d.image("import", str(layout))
    d.image("ls")
    d.image("inspect", "demo:1")

    say("Mounting it writable: a new active snapshot on top of the two layers takes the changes")
    mnt = d.tmp / "mnt"
    key = d.mount("demo:1", mnt, "--writable")
    if ROOT:
        print("Running a shell inside it (an ordinary user runs `unshare -r chroot ...`: root in a user namespace)")
    else:
        print("Running a shell inside it, as root of a user namespace that maps root to you (unshare -r): there\n"
              "the image's files are root's again, and you may chroot")
    d.shell(mnt, CHANGE)

    say("Unmounting, then committing the changes as a third layer of a new image, demo:2")
    d.umount(mnt)
    d.image("commit", key, "demo:2")
    d.image("inspect", "demo:2")

    say("Exporting demo:2 as an OCI archive that other tools read")
    archive = d.tmp / "demo-2.tar"
    d.image("export", "demo:2", str(archive))
    if shutil.which("skopeo"):
        out = d.run(["skopeo", "--insecure-policy", "inspect", f"oci-archive:{archive}"])
        info = json.loads(out)
        print(f"skopeo reads it: {len(info['Layers'])} layers, {info['Os']}/{info['Architecture']}")
    else:
        print("(skopeo is not installed: `skopeo inspect oci-archive:$T/demo-2.tar` would show it; apt-get install"
              " skopeo)")

    say("Mounting demo:2 read-only: the shell's change is there, and nothing can be written")
    d.mount("demo:2", mnt)
    d.shell(mnt, LOOK)
    d.umount(mnt)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="unionfs-image-demo-"))
    print(f"Working in T={tmp}")
    d = Demo(tmp)
    try:
        demo(d)
    except (DemoError, OSError, subprocess.SubprocessError) as exc:
        print(f"image-demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("image-demo: interrupted", file=sys.stderr)
        return 130
    finally:
        d.cleanup()
    print(f"\nDone: everything is unmounted and {tmp} has been removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
