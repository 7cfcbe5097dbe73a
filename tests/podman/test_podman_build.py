"""``podman build`` of a Containerfile whose steps delete files and directories, replace a directory by a file
and a file by a directory, and recreate deleted names in later steps, each step checking what the earlier ones
did; then the final image, run, and its file tree compared between the two mount programs.

(A directory deleted and made again in the same step is not among them: podman 4.3's containers/storage loses
that change when it commits the step over an image of more than one layer with any mount program, fuse-overlayfs
included: the new directory's opaque marker is not carried into the layer and the old entries come back.
tests/podman/test_podman_commit.py checks that case over the one-layer test image, where it works.)

Every step runs in a container whose lower layers are the image's layers as containers/storage stores them
with a mount program: deletions of earlier steps are AUFS-style ``.wh.NAME`` files and opaque directories
hold ``.wh..wh..opq``, which the mount program must honour and hide.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from podman_env import IMAGE, MOUNT_PROGRAMS, CommandFailed, Engine

if TYPE_CHECKING:
    from conftest import Engines

CONTAINERFILE = f"""\
FROM {IMAGE}
RUN rm /x /keep/gone
RUN check -a /x -a /keep/gone -w / -w /keep && test -f /keep/stay && rm -r /deldir
RUN check -a /deldir -w / && rm -r /dir2file && echo now a file > /dir2file
RUN test -f /dir2file && test "$(cat /dir2file)" = "now a file" && rm /file2dir && mkdir /file2dir \\
    && echo inside > /file2dir/f
RUN test -d /file2dir && test "$(cat /file2dir/f)" = inside && check -w / -w /file2dir && rm /opq/old1
RUN check -a /opq/old1 -w /opq && test "$(ls -A /opq)" = old2 && mkdir /deldir && echo again > /deldir/again \\
    && echo back > /x
RUN check -w / -w /deldir && test "$(ls -A /deldir)" = again && test "$(cat /x)" = back && rm /x
RUN check -a /x -a /keep/gone -a /deldir/a -a /deldir/sub -a /dir2file/c -a /opq/old1 \\
    -w / -w /keep -w /deldir -w /file2dir -w /opq -w /data
"""

#: podman's own files in a running container: bind mounts and mount points, not the image's
RUNTIME_PATHS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")

#: every path of the container but /proc, /sys, /dev and /run, with its type, size, mode and owner
TREE_SCRIPT = (
    "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \\) -prune -o -print0 "
    "| xargs -0 stat -c '%n|%F|%s|%a|%u|%g'"
)


def tree(engine: Engine, image: str) -> dict[str, str]:
    """path -> "type size mode uid:gid" of every path of ``image`` as a container sees it (no size for
    directories: theirs is the backing file system's)."""
    out = engine.podman("run", "--rm", image, "sh", "-c", TREE_SCRIPT).stdout
    found = {}
    for line in out.splitlines():
        path, kind, size, mode, uid, gid = line.rsplit("|", 5)
        if path in RUNTIME_PATHS:
            continue
        found[path] = f"{kind} {'-' if kind == 'directory' else size} {mode} {uid}:{gid}"
    return found


class Builds:
    """The build of each engine, made once (the test of the build and the comparison of the trees share it);
    a failed build is kept as its error."""

    def __init__(self, context: Path) -> None:
        self.context = context
        self.done: dict[str, dict[str, str] | CommandFailed] = {}
        self.lock = threading.Lock()

    def tree(self, engine: Engine) -> dict[str, str]:
        with self.lock:
            if engine.id not in self.done:
                try:
                    self.done[engine.id] = self._build(engine)
                except CommandFailed as exc:
                    self.done[engine.id] = exc
            got = self.done[engine.id]
        if isinstance(got, CommandFailed):
            raise got
        return got

    def _build(self, engine: Engine) -> dict[str, str]:
        name = "localhost/unionfs-test-built:latest"
        engine.podman("build", "--network", "none", "--no-cache", "-t", name, "-f", self.context / "Containerfile",
                      self.context)
        return tree(engine, name)


@pytest.fixture(scope="module")
def builds(engines: Engines) -> Builds:
    context = engines.top / "build-context"
    if not context.exists():
        context.mkdir(mode=0o755)
        (context / "Containerfile").write_text(CONTAINERFILE)
        (context / "Containerfile").chmod(0o644)
    return Builds(context)


def test_build(engine: Engine, builds: Builds) -> None:
    """Every step's checks pass, and the final image shows none of the deleted names and no .wh. name."""
    found = builds.tree(engine)
    for gone in ("/x", "/keep/gone", "/deldir/a", "/deldir/sub", "/dir2file/c", "/opq/old1"):
        assert gone not in found
    assert [p for p in found if "/.wh." in p] == []
    assert found["/dir2file"].startswith("regular file 11 ")
    assert found["/file2dir"].startswith("directory ")
    assert found["/file2dir/f"].startswith("regular file 7 ")
    assert found["/deldir/again"].startswith("regular file 6 ")
    assert found["/opq/old2"] == "regular file 5 644 0:0"
    assert found["/keep/stay"] == "regular file 6 644 0:0"
    assert found["/data/owned"] == "regular file 14 640 1000:1000"


@pytest.mark.parametrize("mode", ["root", "rootless"])
def test_build_trees_identical(mode: str, engines: Engines, builds: Builds) -> None:
    """The final image's file tree (names, types, sizes, modes, owners) is the same with both mount programs."""
    reference, other = (builds.tree(engines.get(mode, program)) for program in MOUNT_PROGRAMS)
    assert {p: other.get(p) for p in reference if reference[p] != other.get(p)} == {}
    assert sorted(set(other) - set(reference)) == []
