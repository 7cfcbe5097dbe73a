"""``podman commit`` of a container that changed, deleted and replaced files, then a run of the new image."""

from __future__ import annotations

from podman_env import IMAGE, Engine

CHANGES = (
    "echo changed > /data/hello.txt && rm /keep/gone && rm -r /deldir && rm -r /dir2file && echo f > /dir2file"
    " && rm /file2dir && mkdir /file2dir && echo in > /file2dir/f && mkdir /newdir && echo n > /newdir/f"
    " && chmod 600 /keep/stay && chown 1000:1000 /keep/stay && ln -s /data/hello.txt /newlink"
)

CHECKS = (
    "check -a /keep/gone -a /deldir -a /dir2file/c -w / -w /keep -w /file2dir"
    " && cat /data/hello.txt /dir2file /file2dir/f /newdir/f /newlink && stat -c '%n %a %u:%g' /keep/stay"
    " && find / -xdev -name '.wh.*'"
)


def commit(engine: Engine, changes: str, image: str) -> None:
    engine.podman("rm", "--force", "commit-src", check=False)
    try:
        engine.podman("run", "--name", "commit-src", IMAGE, "sh", "-c", changes)
        engine.podman("commit", "commit-src", image)
    finally:
        engine.podman("rm", "--force", "commit-src", check=False)


def test_commit(engine: Engine) -> None:
    """The committed image shows the container's changes, and no .wh. name."""
    commit(engine, CHANGES, "localhost/unionfs-test-committed:latest")
    out = engine.podman("run", "--rm", "localhost/unionfs-test-committed:latest", "sh", "-c", CHECKS).stdout
    assert out.splitlines() == ["changed", "f", "in", "n", "changed", "/keep/stay 600 1000:1000"]


def test_commit_directory_made_again(engine: Engine) -> None:
    """A directory deleted and made again in the container is opaque in the committed image: the image's entries
    under it stay hidden.

    Alone in its container: podman 4.3's containers/storage loses the deletions under such a directory when the
    same container also deletes another directory (``rm -r /deldir``), with fuse-overlayfs as with any mount
    program, and the image's entries come back."""
    commit(engine, "rm -r /opq && mkdir /opq && echo new > /opq/new", "localhost/unionfs-test-opaque:latest")
    out = engine.podman("run", "--rm", "localhost/unionfs-test-opaque:latest", "sh", "-c",
                        "check -a /opq/old1 -a /opq/old2 -w /opq && ls -A /opq"
                        " && find / -xdev -name '.wh.*'").stdout
    assert out == "new\n"
