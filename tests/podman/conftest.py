"""Fixtures of the podman and buildah tests: one private storage per mode (root, rootless) and mount program
(fuse-overlayfs, the reference, and unionfs), each holding the test image, made once per session.

Run as root (``.venv/bin/python -m pytest -q tests/podman``; tests/run.sh does, in its main pass): the root
engines run podman directly; the rootless engines run it as the user ``unionfs-test`` (created when missing,
with subordinate ids), with ``/dev/fuse`` opened to every user for the session (its mode is put back at the
end). Run as an ordinary user with subordinate ids and a usable ``/dev/fuse``, only the rootless engines run,
as that user. The unionfs command is the venv's (beside the interpreter) or the one on PATH; when the rootless
user cannot run it, a copy staged by tests/rootless_stage.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from podman_env import (  # noqa: E402
    MODES,
    MOUNT_PROGRAMS,
    ROOTLESS_PYTHON,
    CommandFailed,
    Engine,
    NoRootlessUser,
    User,
    ensure_rootless_user,
    make_rootfs_tar,
    missing_tools,
    mounts_under,
    python_minor,
    short_name,
    short_tmp,
    stage_unionfs,
    unionfs_command,
    user_can_run,
    write_containers_conf,
)

FUSE_DEV = "/dev/fuse"


class Engines:
    """The engines of the session, made on first use; an engine that could not be set up is remembered as the
    reason, and every test using it fails (a missing mount program skips)."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.made: dict[tuple[str, str], Engine | BaseException] = {}
        self.containers_conf = write_containers_conf(top / "containers.conf")
        self._tarball: Path | None = None
        self._user: User | None = None
        self._fuse_mode: int | None = None
        self._staged: Path | None = None

    # -- what the engines share

    def tarball(self) -> Path:
        if self._tarball is None:
            d = self.top / "image"
            d.mkdir(mode=0o755)
            self._tarball = make_rootfs_tar(d)
        return self._tarball

    def rootless_user(self) -> User:
        if self._user is None:
            try:
                self._user = ensure_rootless_user()
            except NoRootlessUser as exc:
                pytest.skip(str(exc))
            if os.geteuid() != 0 and not os.access(FUSE_DEV, os.R_OK | os.W_OK):
                pytest.skip(f"{FUSE_DEV} is not open to {self._user.name}")
            if os.geteuid() == 0:
                mode = stat.S_IMODE(os.stat(FUSE_DEV).st_mode)
                if mode & 0o006 != 0o006:
                    self._fuse_mode = mode
                    os.chmod(FUSE_DEV, 0o666)
        return self._user

    def program(self, mode: str, program: str) -> Path:
        if program == "fuse-overlayfs":
            path = Path("/usr/bin/fuse-overlayfs")
            if not path.exists():
                pytest.skip("fuse-overlayfs is not installed (tests/setup.sh installs it)")
            return path
        cmd = unionfs_command()
        if cmd is None:
            pytest.skip(f"no unionfs command beside {sys.executable} or on PATH (tests/setup.sh makes .venv)")
        if mode == "root" or user_can_run(self.rootless_user(), cmd):
            return cmd
        # The venv (or the interpreter it links to) is not readable by the rootless user: a copy that is.
        if self._staged is None:
            ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
            if python_minor(ROOTLESS_PYTHON) != ours:
                pytest.skip(f"{cmd} cannot be run by the rootless user and {ROOTLESS_PYTHON} is not Python "
                            f"{ours}, which a copy of the packages would need")
            self._staged = stage_unionfs(self.top / "stage")
        return self._staged

    # -- the engines

    def get(self, mode: str, program: str) -> Engine:
        reason = missing_tools(mode)
        if reason is not None:
            pytest.skip(reason)
        key = (mode, program)
        if key not in self.made:
            try:
                self.made[key] = self._make(mode, program)
            except (CommandFailed, OSError) as exc:
                self.made[key] = exc
        got = self.made[key]
        if isinstance(got, BaseException):
            raise CommandFailed(f"setting up the {mode} storage with {program} failed: {got}")
        return got

    def _make(self, mode: str, program: str) -> Engine:
        user = self.rootless_user() if mode == "rootless" else None
        path = self.program(mode, program)
        tarball = self.tarball()
        engine = Engine(mode, program, path, self.top / short_name(mode, program), self.containers_conf, user)
        engine.setup()
        engine.import_image(tarball)
        return engine

    def close(self) -> list[str]:
        left = []
        for got in self.made.values():
            if isinstance(got, Engine):
                left += got.destroy()
        if self._fuse_mode is not None:
            os.chmod(FUSE_DEV, self._fuse_mode)
        return left


@pytest.fixture(scope="session")
def engines() -> Iterator[Engines]:
    top = Path(tempfile.mkdtemp(prefix="unionfs-podman-", dir=short_tmp()))
    top.chmod(0o755)
    e = Engines(top)
    try:
        yield e
    finally:
        left = e.close()
        if left:
            print(f"\npodman tests: still mounted after the reset, unmounted lazily: {' '.join(left)}",
                  file=sys.stderr)
        if not mounts_under(top):
            shutil.rmtree(top, ignore_errors=True)

ENGINE_PARAMS = [pytest.param((mode, program), id=f"{mode}-{program}") for mode in MODES
                 for program in MOUNT_PROGRAMS]


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest, engines: Engines) -> Engine:
    """The storage of one mode and mount program, with the test image in it."""
    mode, program = request.param
    return engines.get(mode, program)
