"""``podman run --uidmap``: the container runs in a user namespace of its own and the mount program shows the
image's files with the ids of that namespace (containers/storage passes uidmapping=/gidmapping=), so root's files
are root's inside; files the container creates are stored with the image's ids (unshifted) in the upper layer."""

from __future__ import annotations

import os
from pathlib import Path

from podman_env import IMAGE, Engine

SCRIPT = (
    "stat -c %u:%g /bin/busybox /data/owned; cat /data/private; id -u; touch /tmp/new; mkdir /tmp/dir; touch /tmp/owned"
    " && chown 1000:1000 /tmp/owned && stat -c %u:%g /tmp/new /tmp/dir /tmp/owned && echo more >> /data/hello.txt"
    " && stat -c %u:%g /data/hello.txt"
)


def test_run_uidmap(engine: Engine) -> None:
    # As root the container's ids are host ids 100000...; rootless, ids 1... of the user's own namespace (its
    # subordinate ids), as the user cannot map more.
    first = 100000 if engine.mode == "root" else 1
    mapping = f"0:{first}:65536"
    engine.podman("rm", "--force", "uidmap-ctr", check=False)
    try:
        out = engine.podman("run", "--name", "uidmap-ctr", "--uidmap", mapping, "--gidmap", mapping, IMAGE,
                            "sh", "-c", SCRIPT).stdout
        assert out.splitlines() == ["0:0", "1000:1000", "secret", "0", "0:0", "0:0", "1000:1000", "0:0"]
        upper = Path(engine.podman("inspect", "uidmap-ctr", "--format", "{{.GraphDriver.Data.UpperDir}}")
                     .stdout.strip())
        on_disk = {name: (os.lstat(upper / name).st_uid, os.lstat(upper / name).st_gid)
                   for name in ("tmp/new", "tmp/dir", "tmp/owned", "data/hello.txt")}
        root, user = engine.host_uid(0), engine.host_uid(1000)
        root_g, user_g = engine.host_gid(0), engine.host_gid(1000)
        assert on_disk == {"tmp/new": (root, root_g), "tmp/dir": (root, root_g), "tmp/owned": (user, user_g),
                           "data/hello.txt": (root, root_g)}
    finally:
        engine.podman("rm", "--force", "uidmap-ctr", check=False)
