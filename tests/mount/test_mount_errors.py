"""Refused mounts: a one-line ``unionfs: error: ...`` naming the offending option or path, a non-zero exit, and
nothing created or changed on disk (no ``work`` directory in workdir, upper untouched, nothing mounted)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounthelp import Layers, Mounts, is_mounted, pid_file, snapshot

from unionfs.fuse import server
from unionfs.options import MountSpec, parse
from unionfs.preflight import MountError, WorkdirLock

pytestmark = pytest.mark.mount


def expect_refusal(mounts: Mounts, layers: Layers, args: list[str | os.PathLike[str]], *mentions: object,
                   mnt: Path | None = None, watch: tuple[Path, ...] = ()) -> str:
    """Run ``unionfs mount ARGS``; check the refusal and that nothing changed; return the message."""
    mnt = layers.mnt if mnt is None else mnt
    dirs = (layers.l1, layers.l2, layers.upper, layers.work, layers.mnt, *watch)
    before = snapshot(*dirs)
    r = mounts.try_mount(*args, mnt=mnt)
    assert r.returncode != 0, f"mount was accepted: {args}"
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    msg = lines[0]
    assert msg.startswith("unionfs: error: "), msg
    for m in mentions:
        assert str(m) in msg, f"{m!r} not mentioned in {msg!r}"
    assert not is_mounted(mnt)
    assert not (layers.work / "work").exists(), "a refused mount created workdir/work"
    assert snapshot(*dirs) == before, "a refused mount changed the layers"
    return msg


def test_unknown_option(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", layers.opts("frobnicate=3"), layers.mnt], "frobnicate")


def test_unknown_flag(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", layers.opts("bogusflag"), layers.mnt], "bogusflag")


def test_unsupported_kernel_option_value(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", layers.opts("redirect_dir=on"), layers.mnt], "redirect_dir")


def test_empty_lowerdir(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", "lowerdir=", layers.mnt], "lowerdir")


def test_lowerdir_with_empty_entry(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1}::{layers.l2}", layers.mnt], "lowerdir")


def test_upperdir_without_workdir(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={layers.upper}", layers.mnt], "workdir")


def test_workdir_without_upperdir(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},workdir={layers.work}", layers.mnt], "upperdir")


def test_missing_lowerdir(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", f"upperdir={layers.upper},workdir={layers.work}", layers.mnt],
                   "lowerdir")


def test_no_options_at_all(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, [layers.mnt], "lowerdir")


def test_lowerdir_missing(layers: Layers, mounts: Mounts) -> None:
    missing = layers.base / "nope"
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1}:{missing},upperdir={layers.upper},"
                                          f"workdir={layers.work}", layers.mnt], missing)
    assert not missing.exists()


def test_lowerdir_is_a_file(layers: Layers, mounts: Mounts) -> None:
    f = layers.l1 / "top.txt"
    expect_refusal(mounts, layers, ["-o", f"lowerdir={f},upperdir={layers.upper},workdir={layers.work}",
                                    layers.mnt], f)


def test_upperdir_missing(layers: Layers, mounts: Mounts) -> None:
    missing = layers.base / "no-upper"
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={missing},workdir={layers.work}",
                                    layers.mnt], missing)
    assert not missing.exists()


def test_workdir_missing(layers: Layers, mounts: Mounts) -> None:
    missing = layers.base / "no-work"
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={layers.upper},workdir={missing}",
                                    layers.mnt], missing)
    assert not missing.exists()


def test_upper_inside_lower(layers: Layers, mounts: Mounts) -> None:
    up = layers.l1 / "up"
    up.mkdir()
    msg = expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={up},workdir={layers.work}",
                                          layers.mnt], up, "upperdir")
    assert str(layers.l1) in msg


def test_lower_inside_upper(layers: Layers, mounts: Mounts) -> None:
    low = layers.upper / "low"
    low.mkdir()
    expect_refusal(mounts, layers, ["-o", f"lowerdir={low},upperdir={layers.upper},workdir={layers.work}",
                                    layers.mnt], low, "upperdir")


def test_upper_is_lower(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={layers.l1},workdir={layers.work}",
                                    layers.mnt], layers.l1)


def test_workdir_inside_upper(layers: Layers, mounts: Mounts) -> None:
    wk = layers.upper / "wk"
    wk.mkdir()
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={layers.upper},workdir={wk}",
                                    layers.mnt], "workdir")
    assert os.listdir(wk) == []


def test_upper_inside_workdir(layers: Layers, mounts: Mounts) -> None:
    up = layers.work / "up"
    up.mkdir()
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={up},workdir={layers.work}",
                                    layers.mnt], "workdir")


def test_workdir_inside_lower(layers: Layers, mounts: Mounts) -> None:
    wk = layers.l2 / "wk"
    wk.mkdir()
    expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1}:{layers.l2},upperdir={layers.upper},"
                                          f"workdir={wk}", layers.mnt], wk, "workdir")
    assert os.listdir(wk) == []


def test_mountpoint_inside_lower(layers: Layers, mounts: Mounts) -> None:
    mnt = layers.l2 / "dir"
    expect_refusal(mounts, layers, ["-o", layers.opts(), mnt], "mountpoint", mnt, mnt=mnt)


def test_mountpoint_is_upper(layers: Layers, mounts: Mounts) -> None:
    expect_refusal(mounts, layers, ["-o", layers.opts(), layers.upper], "mountpoint", layers.upper,
                   mnt=layers.upper)


def test_mountpoint_inside_workdir(layers: Layers, mounts: Mounts) -> None:
    mnt = layers.work / "m"
    mnt.mkdir()
    expect_refusal(mounts, layers, ["-o", layers.opts(), mnt], "mountpoint", mnt, mnt=mnt)


def test_mountpoint_missing(layers: Layers, mounts: Mounts) -> None:
    mnt = layers.base / "no-mnt"
    expect_refusal(mounts, layers, ["-o", layers.opts(), mnt], mnt, mnt=mnt)
    assert not mnt.exists()


def test_mountpoint_is_a_file(layers: Layers, mounts: Mounts) -> None:
    mnt = layers.base / "file"
    mnt.write_text("")
    expect_refusal(mounts, layers, ["-o", layers.opts(), mnt], mnt, mnt=mnt)


def test_workdir_in_use(layers: Layers, mounts: Mounts) -> None:
    mounts.mount(layers.opts(), layers.mnt)
    (layers.mnt / "while-mounted").write_text("x")
    upper2 = layers.base / "upper2"
    mnt2 = layers.base / "mnt2"
    upper2.mkdir()
    mnt2.mkdir()
    work_before = snapshot(layers.work)
    upper_before = snapshot(upper2)
    r = mounts.try_mount("-o", f"lowerdir={layers.l2},upperdir={upper2},workdir={layers.work}", mnt2, mnt=mnt2)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: error: "), r.stderr
    assert str(layers.work) in lines[0] and "in use" in lines[0]
    assert not is_mounted(mnt2)
    assert snapshot(layers.work) == work_before
    assert snapshot(upper2) == upper_before
    # the first mount is unharmed
    assert (layers.mnt / "while-mounted").read_text() == "x"
    (layers.mnt / "after").write_text("y")
    assert (layers.upper / "after").read_text() == "y"
    mounts.umount(layers.mnt)


@pytest.fixture
def other_fs(tmp_path: Path, layers: Layers, mounts: Mounts) -> Iterator[Path]:
    """A fresh directory on another filesystem than the layers: a tmpfs mounted for the test (as root), else one
    in /dev/shm when that is another filesystem (an ordinary user cannot mount one)."""
    if os.geteuid() == 0:
        fs = tmp_path / "tmpfs"
        mounts.mount_tmpfs(fs)
        yield fs
        return
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != layers.upper.stat().st_dev):
        pytest.skip("needs root to mount a tmpfs, or a writable /dev/shm on another filesystem than the layers")
    d = Path(tempfile.mkdtemp(prefix="unionfs-mount-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_workdir_on_another_filesystem(other_fs: Path, layers: Layers, mounts: Mounts) -> None:
    wk = other_fs / "work"
    wk.mkdir()
    msg = expect_refusal(mounts, layers, ["-o", f"lowerdir={layers.l1},upperdir={layers.upper},workdir={wk}",
                                          layers.mnt], wk, watch=(wk,))
    assert "filesystem" in msg
    assert os.listdir(wk) == []


def test_readonly_does_not_touch_workdir(layers: Layers, mounts: Mounts) -> None:
    """With ``ro`` the upper and workdir are layers only: no ``work`` directory appears."""
    before = snapshot(layers.upper, layers.work)
    mounts.mount(layers.opts("ro"), layers.mnt)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    mounts.umount(layers.mnt)
    assert snapshot(layers.upper, layers.work) == before


@pytest.mark.parametrize("argv", [["-o", "LOWERS"], ["-x", "-o", "LOWERS", "MNT"]], ids=["no-mountpoint", "bad-flag"])
def test_command_line_usage_errors(layers: Layers, mounts: Mounts, argv: list[str]) -> None:
    """Malformed command lines (argparse's territory) exit 2 and change nothing."""
    args = [a.replace("LOWERS", f"lowerdir={layers.l1}").replace("MNT", str(layers.mnt)) for a in argv]
    before = snapshot(layers.l1, layers.upper, layers.work, layers.mnt)
    r = mounts.try_mount(*args, mnt=layers.mnt)
    assert r.returncode == 2
    assert "error:" in r.stderr
    assert not is_mounted(layers.mnt)
    assert snapshot(layers.l1, layers.upper, layers.work, layers.mnt) == before


def test_regression_unwritable_log_file(layers: Layers, mounts: Mounts, tmp_path: Path) -> None:
    # An unopenable --log FILE used to end in a Python traceback.
    log = tmp_path / "no-such-dir" / "unionfs.log"
    expect_refusal(mounts, layers, ["--log", log, "-o", layers.opts(), layers.mnt], "log file", log)



# -- one error boundary: any exception is one line and a documented status, never a traceback ------------------


def test_regression_workdir_work_not_a_directory(layers: Layers, mounts: Mounts) -> None:
    # An OSError while preparing the mount (here: workdir/work is a file, not a directory) used to end in a
    # Python traceback.
    (layers.work / "work").write_text("")
    before = snapshot(layers.l1, layers.l2, layers.upper, layers.work, layers.mnt)
    r = mounts.try_mount("-o", layers.opts(), layers.mnt, mnt=layers.mnt)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"unionfs: error: workdir/work is not a directory: {layers.work / 'work'}\n"
    assert not is_mounted(layers.mnt)
    assert snapshot(layers.l1, layers.l2, layers.upper, layers.work, layers.mnt) == before


#: `python -c` this with ``unionfs ARGS...``: the mount API (mount and unmount) raises EXCEPTION
FORCED = """\
import sys
from unionfs.fuse import server
def fail(*args, **kwargs):
    raise {exception}
server.mount = server.unmount = fail
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("exception", "status", "line"), [
    ("OSError(5, 'Input/output error', '/some/where')", 1, "unionfs: error: Input/output error: /some/where"),
    ("OSError(13, 'Permission denied')", 1, "unionfs: error: Permission denied"),
    ("ZeroDivisionError('forced')", 1, "unionfs: error: unexpected ZeroDivisionError: forced"),
    ("RuntimeError('two\\nlines')", 1, "unionfs: error: unexpected RuntimeError: two\\nlines"),
    ("KeyboardInterrupt()", 130, "unionfs: interrupted"),
], ids=["oserror", "oserror-no-file", "unexpected", "unexpected-two-lines", "interrupt"])
@pytest.mark.parametrize("argv", [["mount", "-o", "lowerdir=/l", "/mnt"], ["umount", "/mnt"],
                                  ["unionfs", "/mnt", "-o", "lowerdir=/l"]], ids=["mount", "umount", "helper"])
def test_regression_any_exception_is_one_line(exception: str, status: int, line: str, argv: list[str]) -> None:
    # Errors other than OptionError, MountError and (for mount) RuntimeError used to end in a traceback.
    r = subprocess.run([sys.executable, "-c", FORCED.format(exception=exception), *argv], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (status, "", line + "\n")


def test_option_errors_are_bad_usage_before_pyfuse3_loads() -> None:
    code = ("import sys\nfrom unionfs.cli import main\ncode = main(['mount', '-o', 'frobnicate', '/mnt'])\n"
            "assert 'pyfuse3' not in sys.modules and 'trio' not in sys.modules\nsys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, "unionfs: error: unknown mount option 'frobnicate' "
                                           "(see 'unionfs mount --help')\n")


@pytest.mark.parametrize("command", ["mount", "umount"])
def test_help_documents_the_exit_statuses(command: str) -> None:
    r = subprocess.run([sys.executable, "-m", "unionfs", command, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    assert "exit status: 0 " in r.stdout and " 1 " in r.stdout and " 2 bad usage" in r.stdout
    assert "130 interrupted" in r.stdout


# -- the mount API, called in this process (nothing gets mounted) ---------------------------------------------


@pytest.fixture
def quiet_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """server.mount without its logging set-up (it would replace pytest's handlers in this process)."""
    monkeypatch.setattr(server, "setup_logging", lambda *args: None)


def test_regression_refused_mount_leaves_the_callers_umask(layers: Layers, quiet_server: None) -> None:
    # mount() set the umask to 0 before its checks and left it so when it raised.
    old = os.umask(0o027)
    try:
        spec = parse([layers.opts().replace(str(layers.l2), str(layers.base / "missing"))])
        with pytest.raises(MountError, match="no such directory"):
            server.mount(spec, layers.mnt)
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_regression_failed_fuse_mount_releases_the_workdir(layers: Layers, quiet_server: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # When the FUSE mount itself failed (pyfuse3.init raising RuntimeError), the workdir lock, the layers' file
    # descriptors and the blocked signals were left as they were: a caller of the mount API could not mount
    # the workdir again.
    def refuse(*args: object) -> None:
        raise RuntimeError("fuse: mount failed (forced)")

    monkeypatch.setattr(server.pyfuse3, "init", refuse)
    spec = parse([layers.opts()])
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MountError, match=f"mounting {layers.mnt} failed: fuse: mount failed"):
        server.mount(spec, layers.mnt, foreground=True)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == mask
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not os.path.exists(pid_file(str(layers.mnt)))
    WorkdirLock(os.fsencode(layers.work)).close()  # free again
    assert not is_mounted(layers.mnt)


def test_mount_api_takes_a_mount_spec(layers: Layers, mounts: Mounts, quiet_server: None) -> None:
    """The one mount function, as the commands call it: background, returning once mounted."""
    spec = MountSpec(lowers=(os.fsencode(layers.l1), os.fsencode(layers.l2)), upper=os.fsencode(layers.upper),
                     work=os.fsencode(layers.work))
    mounts.points.append(layers.mnt)
    umask = os.umask(0o022)
    try:
        server.mount(spec, layers.mnt)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(umask)
    mounts.track(layers.mnt)
    assert is_mounted(layers.mnt)
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    (layers.mnt / "new").write_text("x")
    assert (layers.upper / "new").read_text() == "x"
    mounts.umount(layers.mnt)
    with pytest.raises(MountError, match="not mounted"):
        server.unmount(str(layers.mnt))
