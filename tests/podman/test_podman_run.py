"""``podman run`` of the test image: starting a container, reading the image's files, --userns=keep-id."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from podman_env import IMAGE, Engine, mounts_under


def test_run_true(engine: Engine) -> None:
    engine.podman("run", "--rm", IMAGE, "true")


def test_root_is_served_by_the_mount_program(engine: Engine) -> None:
    """The container's / is a FUSE mount of the mount program under test (not the kernel's overlayfs)."""
    out = engine.podman("run", "--rm", IMAGE, "cat", "/proc/self/mountinfo").stdout
    root = [line.split(" - ")[1].split()[0] for line in out.splitlines() if line.split()[4] == "/"]
    assert root == [engine.fstype]


def fuse_mounts(engine: Engine) -> list[str]:
    return [point for point, fstype in mounts_under(engine.graphroot) if fstype == engine.fstype]


def test_unmounted_after_run(engine: Engine) -> None:
    """While a container runs, one server of the mount program serves its root; once the container is
    removed, containers/storage has unmounted it (``fusermount3 -u``), no mount of the program is left under the
    storage (seen here as root; rootless podman mounts in a namespace of its own) and the server has exited."""
    engine.podman("rm", "--force", "sleeper", check=False)
    try:
        engine.podman("run", "--detach", "--name", "sleeper", IMAGE, "sleep", "60")
        servers = engine.mount_servers()
        assert len(servers) == 1, servers
        if os.geteuid() == 0 and engine.mode == "root":
            assert len(fuse_mounts(engine)) == 1
    finally:
        engine.podman("rm", "--force", "--time", "0", "sleeper")
    deadline = time.monotonic() + 15
    while engine.mount_servers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.mount_servers() == []
    if os.geteuid() == 0 and engine.mode == "root":
        assert fuse_mounts(engine) == []


def test_run_reads_image_files(engine: Engine) -> None:
    script = (
        "cat /data/hello.txt /data/private /data/link; readlink /data/link; "
        "stat -c '%n %F %s %a %u:%g' /data/hello.txt /data/private /data/owned /data/link /keep /tmp; "
        "ls -A /keep /deldir; id -u; stat -c %u /bin/busybox"
    )
    out = engine.podman("run", "--rm", IMAGE, "sh", "-c", script).stdout
    assert out.splitlines() == [
        "hello from the image",
        "secret",
        "hello from the image",
        "hello.txt",
        "/data/hello.txt regular file 21 644 0:0",
        "/data/private regular file 7 600 0:0",
        "/data/owned regular file 14 640 1000:1000",
        "/data/link symbolic link 9 777 0:0",
        "/keep directory 4096 755 0:0",
        "/tmp directory 4096 1777 0:0",
        "/deldir:",
        "a",
        "sub",
        "",
        "/keep:",
        "gone",
        "stay",
        "0",
        "0",
    ]


def test_run_keep_id(engine: Engine) -> None:
    """Rootless ``--userns=keep-id``: the user's own uid inside, the image's files still owned by root; a file the
    user makes there is stored with the user's uid as an id of the image (unshifted, as the image's own files)."""
    if engine.mode != "rootless":
        pytest.skip("--userns=keep-id is for rootless podman")
    assert engine.user is not None
    uid = engine.user.uid
    engine.podman("rm", "--force", "keep-id-ctr", check=False)
    try:
        out = engine.podman("run", "--name", "keep-id-ctr", "--userns=keep-id", IMAGE, "sh", "-c",
                            "stat -c %u /bin/busybox; id -u; stat -c %u:%g /data/owned; cat /data/hello.txt;"
                            " touch /tmp/mine && stat -c %u /tmp/mine").stdout
        assert out.splitlines() == ["0", str(uid), "1000:1000", "hello from the image", str(uid)]
        upper = Path(engine.podman("inspect", "keep-id-ctr", "--format", "{{.GraphDriver.Data.UpperDir}}")
                     .stdout.strip())
        assert os.lstat(upper / "tmp" / "mine").st_uid == engine.host_uid(uid)
    finally:
        engine.podman("rm", "--force", "keep-id-ctr", check=False)
