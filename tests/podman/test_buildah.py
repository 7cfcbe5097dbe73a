"""buildah: ``buildah from`` the test image, ``buildah run`` steps that delete and add files, ``buildah commit``,
and a podman run of the committed image (buildah and podman share the storage)."""

from __future__ import annotations

from podman_env import IMAGE, Engine

RUN_ARGS = ("--network", "none", "--isolation", "oci", "--runtime", "runc")


def test_buildah_from_run_commit(engine: Engine) -> None:
    engine.buildah("rm", "buildah-ctr", check=False)
    try:
        engine.buildah("from", "--name", "buildah-ctr", "--pull-never", IMAGE)
        engine.buildah("run", *RUN_ARGS, "buildah-ctr", "--", "sh", "-c",
                       "rm /x /keep/gone && rm -r /deldir && echo from buildah > /buildah.txt && mkdir /bdir")
        out = engine.buildah("run", *RUN_ARGS, "buildah-ctr", "--", "sh", "-c",
                             "check -a /x -a /keep/gone -a /deldir -w / -w /keep && cat /buildah.txt").stdout
        assert out == "from buildah\n"
        engine.buildah("commit", "buildah-ctr", "localhost/unionfs-test-buildah:latest")
    finally:
        engine.buildah("rm", "buildah-ctr", check=False)
    out = engine.podman("run", "--rm", "localhost/unionfs-test-buildah:latest", "sh", "-c",
                        "check -a /x -a /keep/gone -a /deldir -w / -w /keep && cat /buildah.txt /keep/stay"
                        " && test -d /bdir && find / -xdev -name '.wh.*'").stdout
    assert out == "from buildah\nstays\n"
