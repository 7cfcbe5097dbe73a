"""``-o trace[=FILE]`` through a real mount: operations made in the mount leave a line per kind of union decision
in the trace file (or in the server's log), and a trace file that cannot be opened refuses the mount."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from mounthelp import Layers, Mounts, is_mounted

pytestmark = pytest.mark.mount

LINE = re.compile(r"(\d+\.\d{6}) (.*) \[([^\]]+)\]")


def lines_of(text: str) -> list[tuple[float, str]]:
    """(time, what) of each trace line; every line must have the trace's form."""
    out = []
    for line in text.splitlines():
        m = LINE.fullmatch(line)
        assert m is not None, f"not a trace line: {line!r}"
        out.append((float(m.group(1)), f"{m.group(2)} [{m.group(3)}]"))
    return out


def has(lines: list[tuple[float, str]], pattern: str) -> bool:
    return any(re.fullmatch(pattern, what) for _t, what in lines)


def test_a_trace_line_appears_for_each_kind_of_decision(layers: Layers, mounts: Mounts, base: Path) -> None:
    (layers.l1 / "etc").mkdir()
    (layers.l2 / "etc").mkdir()
    (layers.l2 / "etc" / "os-release").write_text("ID=base\n")
    (layers.l1 / "usr").mkdir()
    (layers.l2 / "usr").mkdir()
    (layers.l2 / "empty").mkdir()
    (layers.l2 / "gone.txt").write_text("x\n")
    log = base / "trace.log"
    opts = layers.opts(f"trace={log}")
    mnt = layers.mnt
    l1, l2, up = (re.escape(str(p)) for p in (layers.l1, layers.l2, layers.upper))

    mounts.mount(opts, mnt)
    assert (mnt / "etc" / "os-release").read_text() == "ID=base\n"
    assert not (mnt / "nope").exists()
    with open(mnt / "etc" / "os-release", "a") as f:  # copy-up, of etc first
        f.write("VERSION=1\n")
    os.unlink(mnt / "gone.txt")
    os.rmdir(mnt / "empty")
    os.mkdir(mnt / "empty")
    assert os.listdir(mnt / "empty") == []
    with pytest.raises(OSError) as ei:
        os.rename(mnt / "usr", mnt / "usr2")
    assert ei.value.errno == errno.EXDEV
    mounts.umount(mnt)
    first = lines_of(log.read_text())
    # the second mount appends; a whiteout of the upper layer hides a lower name on lookup
    mounts.mount(opts, mnt)
    assert not (mnt / "gone.txt").exists()
    mounts.umount(mnt)
    every = lines_of(log.read_text())
    assert every[:len(first)] == first

    times = [t for t, _what in first]
    assert times == sorted(times), "times of one mount go forward"
    expected = {
        "merged directory": rf"lookup etc -> layers 1 \({l1}\), 2 \({l2}\): a merged directory \[directories: .*\]",
        "found": rf"lookup etc/os-release -> layer 2 \({l2}\): found in the uppermost layer holding it "
                 rf"\[upper and lower: .*\]",
        "in no layer": r"lookup nope: in no layer \[upper and lower: .*\]",
        "copy-up of a directory": rf"copy-up etc: directory from layer 1 \({l1}\) in [\d.]+ ms \[directories: .*\]",
        "copy-up": rf"copy-up etc/os-release: 8 bytes from layer 2 \({l2}\) in [\d.]+ ms \[non-directories: .*\]",
        "whiteout on unlink": rf"unlink gone.txt: whiteout created in the upper layer \({up}\) "
                              r"\[whiteouts and opaque directories: .*\]",
        "whiteout on rmdir": rf"rmdir empty: whiteout created in the upper layer \({up}\) "
                             r"\[whiteouts and opaque directories: .*\]",
        "opaque directory made": rf"mkdir empty: opaque directory made over a whiteout in the upper layer \({up}\) "
                                 r"\[whiteouts and opaque directories: .*\]",
        "hidden by an opaque directory": rf"readdir empty: layer 2 \({l2}\) hidden by the opaque directory in "
                                         rf"layer 0 \({up}\) \[whiteouts and opaque directories: .*\]",
        "EXDEV": rf"rename usr -> usr2: EXDEV, usr is a merged directory of layers 1 \({l1}\), 2 \({l2}\) "
                 r"\(redirect_dir off\) \[renaming directories: .*\]",
    }
    missing = [kind for kind, pattern in expected.items() if not has(first, pattern)]
    assert not missing, f"no line for {missing} in:\n" + "\n".join(what for _t, what in first)
    assert has(every[len(first):], rf"lookup gone.txt: whited out by layer 0 \({up}\) "
                                   r"\[whiteouts and opaque directories: .*\]"), every[len(first):]


def test_trace_alone_goes_to_the_servers_log(layers: Layers, mounts: Mounts, base: Path) -> None:
    log = base / "server.log"
    mounts.mount(layers.opts("trace"), layers.mnt, "--log", str(log))
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    mounts.umount(layers.mnt)
    text = log.read_text()
    assert re.search(rf" INFO \d+\.\d{{6}} lookup top.txt -> layer 1 \({re.escape(str(layers.l1))}\): found in the "
                     r"uppermost layer holding it \[", text), text


def test_without_trace_nothing_is_traced(layers: Layers, mounts: Mounts, base: Path) -> None:
    log = base / "server.log"
    mounts.mount(layers.opts(), layers.mnt, "--log", str(log))
    assert (layers.mnt / "top.txt").read_text() == "from l1\n"
    os.unlink(layers.mnt / "top.txt")
    mounts.umount(layers.mnt)
    assert "lookup" not in log.read_text() and "whiteout" not in log.read_text()


def test_a_trace_file_that_cannot_be_opened_refuses_the_mount(layers: Layers, mounts: Mounts, base: Path) -> None:
    where = base / "no-such-dir" / "trace.log"
    r = mounts.try_mount("-o", layers.opts(f"trace={where}"), layers.mnt, mnt=layers.mnt)
    assert r.returncode != 0
    assert r.stderr.splitlines() == [f"unionfs: error: cannot open the trace file {where}: No such file or directory"]
    assert not is_mounted(layers.mnt)
    assert not (layers.work / "work").exists()
