"""The trace of union decisions (``-o trace``): each kind of decision writes exactly its line, naming the layers
and the overlayfs rule; with tracing off no trace code runs; the option's parse/render; the trace file."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_tree import WHITEOUT, Dir

from unionfs import trace
from unionfs.layers import Stack
from unionfs.options import MountSpec, OptionError, parse, render
from unionfs.trace import Tracer
from unionfs.union import Union

#: a copy-up's duration, which the clock of the system decides
MS = r"\d+\.\d{3} ms"


class Recorder:
    """A Tracer over an Env's layers that keeps its lines (all at time 0: its clock stands still)."""

    def __init__(self, env: Any) -> None:
        self.lines: list[str] = []
        self.tracer = Tracer(env.layer_dirs, self.lines.append, writable=env.stack.writable, clock=lambda: 7.0)
        self.union = Union(env.stack, env.work, trace=self.tracer)
        self.dirs = [os.fsdecode(d) for d in env.layer_dirs]

    def take(self) -> list[str]:
        lines, self.lines[:] = list(self.lines), []
        return lines

    def layer(self, i: int) -> str:
        return f"layer {i} ({self.dirs[i]})"


def lookup(rec: Recorder, path: str) -> Any:
    """Look ``path`` up through the traced union, component by component; returns its entry (or None)."""
    entry = rec.union.root()
    for name in path.split("/"):
        entry = rec.union.lookup(entry, name.encode())
        if entry is None:
            return None
    return entry


def assert_lines(lines: list[str], *patterns: str) -> None:
    """Each line matches its pattern, a regular expression once ``{MS}`` is put in for a duration."""
    assert len(lines) == len(patterns), "\n".join(lines)
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"\n{line}\n  does not match\n{pattern}"


@pytest.fixture
def rec(make_env: Callable[..., Any]) -> Callable[..., Recorder]:
    def make(upper: dict[str, Any] | None = None, lowers: list[dict[str, Any]] | None = None, **kw: Any) -> Recorder:
        return Recorder(make_env(upper=upper, lowers=lowers, **kw))

    return make


# -- lookups ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prescan", [False, True])
def test_lookup_found_in_the_uppermost_layer_holding_it(rec: Callable[..., Recorder], prescan: bool) -> None:
    r = rec(lowers=[{"etc": {}}, {"etc": {"os-release": "ID=x\n"}}], prescan=prescan)
    assert lookup(r, "etc/os-release") is not None
    assert r.take() == [
        f"0.000000 lookup etc -> layers 1 ({r.dirs[1]}), 2 ({r.dirs[2]}): a merged directory "
        f"[{trace.RULE_MERGED}]",
        f"0.000000 lookup etc/os-release -> {r.layer(2)}: found in the uppermost layer holding it "
        f"[{trace.RULE_FOUND}]",
    ]


def test_lookup_of_a_name_held_by_two_layers_names_the_upper_one(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"f": "new"}, lowers=[{"f": "old"}, {}])
    assert lookup(r, "f") is not None
    assert r.take() == [f"0.000000 lookup f -> {r.layer(0)}: found in the uppermost layer holding it "
                        f"[{trace.RULE_FOUND}]"]


@pytest.mark.parametrize("prescan", [False, True])
def test_regression_lookup_hidden_by_an_opaque_directory(rec: Callable[..., Recorder], prescan: bool) -> None:
    """A name a lower layer holds below an opaque directory: the trace names the opaque directory (regression:
    it said no layer holds the name)."""
    r = rec(lowers=[{"od": Dir({"new": "1"}, opaque=True)}, {"od": {"hidden": "2"}}], prescan=prescan)
    assert lookup(r, "od/hidden") is None
    assert r.take()[1:] == [f"0.000000 lookup od/hidden: hidden by the opaque directory in {r.layer(1)} "
                            f"[{trace.RULE_OPAQUE}]"]
    assert lookup(r, "od/nothing") is None
    assert r.take()[1:] == [f"0.000000 lookup od/nothing: in no layer [{trace.RULE_MISSING}]"]


@pytest.mark.parametrize("prescan", [False, True])
def test_lookup_whited_out(rec: Callable[..., Recorder], prescan: bool) -> None:
    r = rec(lowers=[{"etc": {"passwd": WHITEOUT}}, {"etc": {"passwd": "root:x:0:0\n"}}], prescan=prescan)
    assert lookup(r, "etc/passwd") is None
    assert r.take()[1:] == [f"0.000000 lookup etc/passwd: whited out by {r.layer(1)} [{trace.RULE_WHITED_OUT}]"]


def test_lookup_in_no_layer(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{}, {"a": "x"}])
    assert lookup(r, "nope") is None
    assert r.take() == [f"0.000000 lookup nope: in no layer [{trace.RULE_MISSING}]"]


def test_lookup_with_a_listing_is_traced_too(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{"gone": WHITEOUT}, {"gone": "x", "here": "y"}])
    root = r.union.root()
    listing = r.union.listdir(root)
    assert r.union.lookup(root, b"here", listing=listing) is not None
    assert r.union.lookup(root, b"gone", listing=listing) is None
    assert r.take() == [
        f"0.000000 lookup here -> {r.layer(2)}: found in the uppermost layer holding it [{trace.RULE_FOUND}]",
        f"0.000000 lookup gone: whited out by {r.layer(1)} [{trace.RULE_WHITED_OUT}]",
    ]


# -- listings --------------------------------------------------------------------------------------------------


def test_readdir_of_an_opaque_directory_names_the_layers_it_hides(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{"var": {"cache": Dir({"new": "1"}, opaque=True)}}, {"var": {"cache": {"old": "2"}}}, {}])
    cache = lookup(r, "var/cache")
    r.take()
    assert set(r.union.listdir(cache)) == {b"new"}
    assert r.take() == [f"0.000000 readdir var/cache: {r.layer(2)} hidden by the opaque directory in "
                        f"{r.layer(1)} [{trace.RULE_OPAQUE}]"]


def test_readdir_of_an_opaque_directory_hiding_nothing_and_of_a_merged_one_is_silent(
        rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{"o": Dir({"a": "1"}, opaque=True), "m": {"a": "1"}}, {"m": {"b": "2"}}])
    root = r.union.root()
    for name in (b"o", b"m"):
        entry = r.union.lookup(root, name)
        r.take()
        r.union.listdir(entry)
        assert r.take() == []


# -- changes ---------------------------------------------------------------------------------------------------


def test_copy_up_of_a_file_and_the_directory_above_it(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{}, {"etc": {"os-release": "ID=base\n"}}])
    f = lookup(r, "etc/os-release")
    r.take()
    os.close(r.union.open(f, os.O_WRONLY))
    assert_lines(
        r.take(),
        re.escape(f"0.000000 copy-up etc: directory from {r.layer(2)} in ") + MS
        + re.escape(f" [{trace.RULE_COPY_UP_DIR}]"),
        re.escape(f"0.000000 copy-up etc/os-release: 8 bytes from {r.layer(2)} in ") + MS
        + re.escape(f" [{trace.RULE_COPY_UP}]"),
    )


def test_copy_up_for_a_truncating_open_copies_metadata_only(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{"f": "12345"}, {}])
    f = lookup(r, "f")
    r.take()
    os.close(r.union.open(f, os.O_WRONLY | os.O_TRUNC))
    assert_lines(r.take(), re.escape(f"0.000000 copy-up f: metadata only (truncated) from {r.layer(1)} in ")
                 + MS + re.escape(f" [{trace.RULE_COPY_UP}]"))


@pytest.mark.parametrize("op", ["unlink", "rmdir"])
def test_removal_of_a_lower_name_creates_a_whiteout(rec: Callable[..., Recorder], op: str) -> None:
    r = rec(lowers=[{"f": "x", "d": {}}, {}])
    root = r.union.root()
    getattr(r.union, op)(root, b"f" if op == "unlink" else b"d")
    assert r.take() == [f"0.000000 {op} {'f' if op == 'unlink' else 'd'}: whiteout created in the upper layer "
                        f"({r.dirs[0]}) [{trace.RULE_REMOVED}]"]


def test_removal_of_an_upper_name_over_a_lower_one_creates_a_whiteout(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"f": "new"}, lowers=[{"f": "old"}, {}])
    r.union.unlink(r.union.root(), b"f")
    assert r.take() == [f"0.000000 unlink f: whiteout created in the upper layer ({r.dirs[0]}) "
                        f"[{trace.RULE_REMOVED}]"]


def test_removal_of_an_upper_only_name_is_silent(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"f": "new", "d": {}}, lowers=[{}, {}])
    r.union.unlink(r.union.root(), b"f")
    r.union.rmdir(r.union.root(), b"d")
    assert r.take() == []


def test_mkdir_over_a_whiteout_makes_an_opaque_directory(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"var": WHITEOUT}, lowers=[{"var": {"old": "x"}}, {}])
    r.union.mkdir(r.union.root(), b"var", stat.S_IFDIR | 0o755, 0, 0)
    assert r.take() == [f"0.000000 mkdir var: opaque directory made over a whiteout in the upper layer "
                        f"({r.dirs[0]}) [{trace.RULE_RECREATED}]"]
    r.union.mkdir(r.union.root(), b"fresh", stat.S_IFDIR | 0o755, 0, 0)
    assert r.take() == []


@pytest.mark.parametrize("merged", [True, False])
def test_rename_of_a_lower_or_merged_directory_returns_exdev(rec: Callable[..., Recorder], merged: bool) -> None:
    r = rec(lowers=[{"usr": {"a": "1"}}, {"usr": {"b": "2"}} if merged else {}])
    root = r.union.root()
    with pytest.raises(OSError) as ei:
        r.union.rename(root, b"usr", root, b"usr2")
    assert ei.value.errno == errno.EXDEV
    what = (f"a merged directory of layers 1 ({r.dirs[1]}), 2 ({r.dirs[2]})" if merged
            else f"a directory of {r.layer(1)}")
    assert r.take() == [f"0.000000 rename usr -> usr2: EXDEV, usr is {what} (redirect_dir off) "
                        f"[{trace.RULE_EXDEV}]"]


def test_rename_of_a_lower_file_copies_it_up_and_leaves_a_whiteout(rec: Callable[..., Recorder]) -> None:
    r = rec(lowers=[{"a": "abc"}, {}])
    root = r.union.root()
    r.union.rename(root, b"a", root, b"b")
    assert_lines(
        r.take(),
        re.escape(f"0.000000 copy-up a: 3 bytes from {r.layer(1)} in ") + MS + re.escape(f" [{trace.RULE_COPY_UP}]"),
        re.escape(f"0.000000 rename a -> b: whiteout created at a in the upper layer ({r.dirs[0]}) "
                  f"[{trace.RULE_MOVED}]"),
    )


def test_rename_of_an_upper_directory_into_a_merged_one_makes_it_opaque(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"new": {"x": "1"}, "m": {}}, lowers=[{"m": {"other": "2"}}, {}])
    root = r.union.root()
    m = r.union.lookup(root, b"m")
    r.take()
    r.union.rename(root, b"new", m, b"new")
    assert r.take() == [f"0.000000 rename new -> m/new: directory made opaque in the upper layer ({r.dirs[0]}) "
                        f"[{trace.RULE_MOVED_OPAQUE}]"]


def test_the_lookups_an_operation_makes_again_are_not_traced(rec: Callable[..., Recorder]) -> None:
    r = rec(upper={"a": "1"}, lowers=[{}, {}])
    root = r.union.root()
    r.union.rename(root, b"a", root, b"b")
    r.union.unlink(root, b"b")
    assert r.take() == []


# -- the line itself -------------------------------------------------------------------------------------------


def test_time_is_seconds_since_the_tracer_was_made_with_six_decimals(tmp_path: Path) -> None:
    times = iter([100.0, 100.0123454, 101.5])
    lines: list[str] = []
    t = Tracer([b"/u", b"/l"], lines.append, writable=True, clock=lambda: next(times))
    t.whiteout("unlink", b"x")
    t.opaque(b"d", 0, [1])
    assert [line.split(" ")[0] for line in lines] == ["0.012345", "1.500000"]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_a_path_never_breaks_its_line(path: bytes) -> None:
    shown = trace.show(path)
    assert not re.search(r"[\x00-\x1f\x7f]", shown)
    assert shown.encode("utf-8")  # (nothing a text file or a log cannot take)
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        assert "\\x" in shown
    else:
        if not re.search(r"[\x00-\x1f\x7f]", text):
            assert shown == text


# -- tracing off -----------------------------------------------------------------------------------------------


def test_with_tracing_off_no_trace_code_runs(make_env: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of decision, through a Union without a tracer: nothing of unionfs.trace is called, nor the
    probes that explain a decision to it."""

    def boom(*_args: object, **_kw: object) -> None:
        raise AssertionError("trace code ran with tracing off")

    for name in ("lookup", "opaque", "copy_up", "whiteout", "opaque_made", "exdev", "line", "layer", "layers",
                 "__init__"):
        monkeypatch.setattr(Tracer, name, boom)
    monkeypatch.setattr(trace, "show", boom)
    monkeypatch.setattr(Stack, "whited_out", boom)
    monkeypatch.setattr(Stack, "hidden_by_opaque", boom)
    env = make_env(upper={"var": WHITEOUT}, lowers=[
        {"var": {"x": "1"}, "etc": {"passwd": WHITEOUT}, "o": Dir({"a": "1"}, opaque=True), "usr": {}},
        {"etc": {"passwd": "x", "os-release": "ID=x\n"}, "o": {"b": "2"}, "usr": {}},
    ])
    u = env.union
    assert u.trace is None
    root = u.root()
    etc = u.lookup(root, b"etc")
    assert u.lookup(etc, b"passwd") is None and u.lookup(root, b"nope") is None
    assert set(u.listdir(u.lookup(root, b"o"))) == {b"a"}
    os.close(u.open(u.lookup(etc, b"os-release"), os.O_WRONLY))
    u.unlink(u.lookup(root, b"etc"), b"os-release")
    u.mkdir(root, b"var", stat.S_IFDIR | 0o755, 0, 0)
    with pytest.raises(OSError) as ei:
        u.rename(root, b"usr", root, b"usr2")
    assert ei.value.errno == errno.EXDEV
    assert env.resolve("etc/os-release") is None and env.resolve("var") is not None


# -- the option ------------------------------------------------------------------------------------------------


def test_option_trace_alone_and_with_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(["lowerdir=/l"]).trace is False
    spec = parse(["lowerdir=/l,trace"])
    assert (spec.trace, spec.trace_file) == (True, None)
    monkeypatch.chdir(tmp_path)
    spec = parse(["lowerdir=/l,trace=out/t.log"])
    assert (spec.trace, spec.trace_file) == (True, os.fsencode(tmp_path / "out" / "t.log"))
    assert parse(["lowerdir=/l,trace=/a", "trace"]).trace_file is None  # (a later option wins)
    with pytest.raises(OptionError, match="trace=FILE"):
        parse(["lowerdir=/l,trace="])


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from([MountSpec(lowers=(b"/l",)), MountSpec(lowers=(b"/a", b"/b"), upper=b"/u",
                                                                     work=b"/w", spare=60.0, debug=True)]),
       file=st.none() | st.lists(st.sampled_from(["a", "b", ",", "=", ":", " ", "é", "\\"]), min_size=1,
                                 max_size=6).map(lambda p: "/t/" + "".join(p)),
       on=st.booleans())
def test_trace_option_round_trip(base: MountSpec, file: str | None, on: bool) -> None:
    spec = dataclasses.replace(base, trace=on or file is not None,
                               trace_file=None if file is None else os.fsencode(file))
    if file is not None and re.search(r"(?<!\\)(\\\\)*\\(,|\Z)", file):
        with pytest.raises(OptionError, match="backslash"):
            render(spec)
    else:
        assert parse([render(spec)]) == spec


# -- the trace file --------------------------------------------------------------------------------------------


def test_trace_file_is_created_private_and_appended_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    path.write_text("earlier\n")
    path.chmod(0o644)
    f = trace.open_file(os.fsencode(path))
    try:
        trace.FileWriter(f)("one")
        assert path.read_text() == "earlier\none\n"  # (line-buffered: there before the file is closed)
    finally:
        f.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    new = tmp_path / "new.log"
    trace.open_file(os.fsencode(new)).close()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["missing/dir/t.log", "", "fifo"])
def test_trace_file_that_cannot_be_opened(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    if where == "fifo":
        os.mkfifo(path)  # (nobody reads it: refused at once, not waited for)
    with pytest.raises(OSError) as ei:
        trace.open_file(os.fsencode(path))
    assert ei.value.errno in {"missing/dir/t.log": {errno.ENOENT}, "": {errno.EISDIR}, "fifo": {errno.ENXIO}}[where]


def test_a_failing_trace_file_stops_the_trace_once(caplog: pytest.LogCaptureFixture) -> None:
    class Full:
        calls = 0

        def write(self, _text: str) -> int:
            Full.calls += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    writer = trace.FileWriter(Full())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="unionfs.trace"):
        for _ in range(3):
            writer("a line")
    assert Full.calls == 1
    assert [r.getMessage() for r in caplog.records] == [
        "trace stopped: cannot write the trace file: [Errno 28] No space left on device"]


def test_log_writer_logs_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="unionfs.trace"):
        Tracer([b"/u"], trace.log_writer, writable=True).whiteout("unlink", b"f")
    assert [(r.levelno, r.name) for r in caplog.records] == [(logging.INFO, "unionfs.trace")]
    assert re.fullmatch(r"\d+\.\d{6} unlink f: whiteout created in the upper layer \(/u\) \[.*\]",
                        caplog.records[0].getMessage())
