"""AUFS-style markers in lower layers (``Stack(..., aufs=True)``, ``-o aufs_markers``): ``.wh.NAME`` deletes NAME
from the layers beneath its own, ``.wh..wh..opq`` makes its directory opaque, and no ``.wh.`` name of a lower
layer is ever an entry. Without ``aufs`` they are ordinary files, as the kernel shows them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from unit_tree import WHITEOUT, Dir, Env, File, is_whiteout

from unionfs import whiteout
from unionfs.layers import PATH_MAX, ROOT, Stack
from unionfs.prescan import Prescanned
from unionfs.union import Union
from unionfs.whiteout import XattrFormat

#: an AUFS marker as containers/storage writes it: an empty regular file, mode 0000
WH = File(b"", mode=0o000)


@pytest.fixture(params=[False, True], ids=["probing", "prescan"])
def prescan(request: pytest.FixtureRequest) -> bool:
    """Whether the lower layers are answered from the table made at mount (``-o prescan``)."""
    return bool(request.param)


@pytest.fixture
def aufs_env(make_env: Any, prescan: bool) -> Any:
    """``aufs_env(upper=..., lowers=[...], writable=True)``: an Env whose stack honours AUFS markers (through
    the prescanned table when the test runs with ``prescan``)."""

    def make(upper: dict[str, Any] | None = None, lowers: list[dict[str, Any]] | None = None,
             writable: bool = True) -> Env:
        env: Env = make_env(upper=upper, lowers=lowers, writable=writable)
        env.stack.close()
        env.stack = Stack(env.layer_dirs, writable=writable, fmt=XattrFormat.TRUSTED,
                          lowers=Prescanned if prescan else None, aufs=True)
        env.union = Union(env.stack, env.work)
        return env

    return make


def _mode(env: Env, path: str) -> int:
    return stat.S_IFMT(env.entry(path).st.st_mode)


# -- the markers --------------------------------------------------------------------------------------------


def test_marker_paths_and_names() -> None:
    assert whiteout.aufs_whiteout_path(b"f") == b".wh.f"
    assert whiteout.aufs_whiteout_path(b"a/b/f") == b"a/b/.wh.f"
    assert whiteout.aufs_hidden_name(b".wh.f") == b"f"
    assert whiteout.aufs_hidden_name(b".wh..f") == b".f"
    assert whiteout.aufs_hidden_name(b".wh..wh..opq") is None
    assert whiteout.aufs_hidden_name(b".wh..wh.plnk") is None
    assert whiteout.is_aufs_marker(b".wh.")
    assert not whiteout.is_aufs_marker(b".wh") and not whiteout.is_aufs_marker(b"x.wh.")


def test_a_marker_of_any_type_counts(tmp_path: Path) -> None:
    """Whatever the marker is (fuse-overlayfs asks only whether it exists), even a dangling symlink."""
    (tmp_path / "d").mkdir()
    os.symlink("nowhere", tmp_path / "d" / ".wh.l")
    (tmp_path / "d" / ".wh.dir").mkdir()
    os.mkfifo(tmp_path / "d" / ".wh.p")
    (tmp_path / "d" / ".wh..wh..opq").mkdir()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in (b"l", b"dir", b"p"):
            assert whiteout.has_aufs_marker(fd, whiteout.aufs_whiteout_path(b"d/" + name)), name
        assert not whiteout.has_aufs_marker(fd, b"d/.wh.none")
        assert not whiteout.has_aufs_marker(fd, b"nodir/.wh.none")
        assert not whiteout.has_aufs_marker(fd, b"d/.wh." + b"n" * 252)  # longer than NAME_MAX
        assert whiteout.has_aufs_opaque(fd, b"d")
        assert not whiteout.has_aufs_opaque(fd, b".")
    finally:
        os.close(fd)


# -- lookups and listings -----------------------------------------------------------------------------------


def test_marker_hides_the_name_in_layers_beneath(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, ".wh.d": WH, "g": "1"}, {"f": "2", "d": {"x": "3"}, "g": "2", "h": "4"}])
    assert env.resolve("f") is None
    assert env.resolve("d") is None
    assert env.resolve("d/x") is None
    assert env.read("g") == b"1"
    assert env.read("h") == b"4"
    assert env.names() == {"g", "h"}
    assert env.tree() == {"g": b"1", "h": b"4"}


def test_name_held_beside_its_marker_in_the_same_layer_shows(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, "f": "mine"}, {"f": "below"}])
    assert env.read("f") == b"mine"
    assert env.entry("f").layer == 1
    assert env.names() == {"f"}


def test_regression_a_directory_beside_its_own_marker_is_opaque(aufs_env: Any) -> None:
    """A marker deletes what the layers beneath hold; the name beside it in its own layer is new (OCI's rule
    for a whiteout and its name in one layer): a directory there shows only its own entries (regression: it
    merged with the directories beneath, bringing back what the marker deleted)."""
    env = aufs_env(lowers=[{".wh.d": WH, "d": {"mine": "1"}}, {"d": {"below": "2"}}])
    assert env.entry("d").dirs == (1,)
    assert env.names("d") == {"mine"}
    assert env.resolve("d/below") is None


def test_marker_names_are_never_entries(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, ".wh..wh.plnk": {"x": "1"}, ".wh..wh.aufs": WH,
                            "d": {".wh..wh..opq": WH, ".wh.a": WH, "b": "1"}},
                           {".wh.g": "ordinary content", "f": "2"}])
    for name in (".wh.f", ".wh..wh.plnk", ".wh..wh.plnk/x", ".wh..wh.aufs", ".wh.g", "d/.wh..wh..opq", "d/.wh.a"):
        assert env.resolve(name) is None, name
    root = env.entry("")
    assert env.union.lookup(root, b".wh.f") is None
    assert env.union.lookup(root, b".wh.f", listing=env.union.listdir(root)) is None
    assert env.names() == {"d"}
    assert env.names("d") == {"b"}


def test_opaque_marker_hides_only_what_is_below(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"d": {".wh..wh..opq": WH, "a": "1", "c": "sibling"}, "e": {"x": "1"}},
                           {"d": {"a": "old", "b": "2"}, "e": {"y": "2"}}])
    d = env.entry("d")
    assert d.dirs == (1,) and d.opaque
    assert env.names("d") == {"a", "c"}
    assert env.resolve("d/b") is None
    assert env.read("d/a") == b"1"
    assert env.read("d/c") == b"sibling"
    assert env.entry("e").dirs == (1, 2)  # a directory without the marker still merges
    assert env.names("e") == {"x", "y"}


def test_markers_of_deeper_layers(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"f": "top", "d": {"new": "n"}},
                           {".wh.f": WH, ".wh.g": WH, "d": {".wh.gone": WH, "kept": "k"}},
                           {"f": "x", "g": "x", "d": {"gone": "g", "old": "o"}},
                           {"g": "y", "h": "z", "d": {".wh..wh..opq": WH, "deep": "d"}},
                           {"d": {"hidden": "h"}}])
    assert env.read("f") == b"top"  # the marker hides only what is beneath its own layer
    assert env.resolve("g") is None
    assert env.read("h") == b"z"
    assert env.entry("d").dirs == (1, 2, 3, 4)  # layer 4 is opaque: layer 5 is not merged
    assert env.names("d") == {"new", "kept", "old", "deep"}
    assert env.resolve("d/gone") is None
    assert env.resolve("d/hidden") is None
    assert env.names() == {"f", "h", "d"}


def test_file_replaced_by_a_directory_and_back(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"x": {".wh..wh..opq": WH, "in": "new"}, "y": "now a file", "z": {"n": "1"}},
                           {"x": "was a file", "y": {"old": "o"}, ".wh.z": WH},
                           {"x": {"older": "o"}, "z": {"o": "2"}}])
    x = env.entry("x")
    assert x.dirs == (1,) and x.opaque
    assert env.names("x") == {"in"}
    assert _mode(env, "y") == stat.S_IFREG and env.read("y") == b"now a file"
    assert env.resolve("y/old") is None
    z = env.entry("z")  # deleted by layer 2's marker, made again by layer 1: nothing of layer 3 shows
    assert z.dirs == (1,)
    assert env.names("z") == {"n"}
    assert env.resolve("z/o") is None


def test_marker_of_a_directory_beneath_an_upper_directory(aufs_env: Any) -> None:
    env = aufs_env(upper={"d": {"u": "1"}}, lowers=[{".wh.d": WH}, {"d": {"l": "2"}}])
    assert env.entry("d").dirs == (0,)
    assert env.names("d") == {"u"}


def test_upper_names_like_markers_are_ordinary(aufs_env: Any) -> None:
    """The upper layer is never read for markers: its ``.wh.`` names are entries, and create nothing."""
    env = aufs_env(upper={".wh.f": "an upper file", "d": {".wh..wh..opq": "x"}},
                   lowers=[{"f": "1", "d": {"a": "2"}}])
    assert env.read(".wh.f") == b"an upper file"
    assert env.read("f") == b"1"
    assert env.names() == {".wh.f", "f", "d"}
    assert env.names("d") == {".wh..wh..opq", "a"}


def test_regression_upper_name_like_a_marker_does_not_disarm_the_lower_marker(aufs_env: Any) -> None:
    """A lower marker whose own name the upper layer also holds still hides its name beneath (regression
    guard: a listing that deduplicated names before reading markers listed the whited-out name)."""
    env = aufs_env(upper={".wh.f": "user file"}, lowers=[{".wh.f": WH}, {"f": "hidden"}])
    assert env.resolve("f") is None
    assert env.names() == {".wh.f"}
    assert env.tree() == {".wh.f": b"user file"}


def test_read_only_stack_reads_markers_in_its_top_layer(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, "d": {".wh..wh..opq": WH}}, {"f": "1", "d": {"a": "2"}}], writable=False)
    assert env.resolve("f") is None
    assert env.names() == {"d"}
    assert env.names("d") == set()


def test_kernel_whiteouts_and_markers_together(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"a": WHITEOUT, ".wh.b": WH, "d": Dir({"x": "1"}, opaque=True)},
                           {"a": "1", "b": "2", "c": "3", "d": {"y": "2"}}])
    assert env.names() == {"c", "d"}
    assert env.names("d") == {"x"}


def test_regression_name_too_long_for_its_marker(aufs_env: Any) -> None:
    """A name of 252 to 255 bytes has no possible marker (``.wh.`` + name exceeds NAME_MAX): the lookup of the
    marker fails with ENAMETOOLONG, which means no marker, not an error."""
    long = "n" * 255
    env = aufs_env(lowers=[{}, {long: "1"}])
    assert env.read(long) == b"1"
    assert env.resolve("m" * 253) is None


def _deep(root: Path, parts: list[str]) -> int:
    """Make directories ``parts`` nested under ``root``, without any path longer than PATH_MAX; returns a
    descriptor of the deepest one."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    for part in parts:
        os.mkdir(part, dir_fd=fd)
        nfd = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _touch(name: str, dir_fd: int, data: bytes = b"", mode: int = 0o644) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
    os.write(fd, data)
    os.close(fd)


def test_regression_marker_of_a_name_at_path_max(aufs_env: Any, prescan: bool) -> None:
    """A merged path of PATH_MAX bytes whose marker's path is longer than PATH_MAX: the marker is found through
    the parent directory (regression guard: a single stat fails with ENAMETOOLONG, and the lookup missed the
    marker that the listing honoured)."""
    parts = ["p" * 200] * 20
    base = "/".join(parts)
    name = "n" * (PATH_MAX - len(base) - 1)
    env = aufs_env(lowers=[{}, {}])
    for layer, fname, data in ((env.lowers[0], ".wh." + name, b""), (env.lowers[1], name, b"hidden")):
        fd = _deep(layer, parts)
        _touch(fname, fd, data)
        _touch("other", fd, data)
        os.close(fd)
    env.stack.close()  # made again over the finished layers (a prescanned table is made once)
    env.stack = Stack(env.layer_dirs, writable=True, fmt=XattrFormat.TRUSTED,
                      lowers=Prescanned if prescan else None, aufs=True)
    env.union = Union(env.stack, env.work)
    assert len(base + "/" + name) == PATH_MAX
    assert env.resolve(base + "/" + name) is None
    assert env.names(base) == {"other"}


def test_without_aufs_markers_are_ordinary_files(make_env: Any, prescan: bool) -> None:
    """The kernel's view: ``.wh.`` names are files like any other, hiding nothing."""
    env = make_env(lowers=[{".wh.f": WH, "d": {".wh..wh..opq": WH}}, {"f": "1", "d": {"a": "2"}}], prescan=prescan)
    assert env.names() == {".wh.f", "f", "d"}
    assert env.names("d") == {".wh..wh..opq", "a"}
    assert env.entry("d").dirs == (1, 2)
    assert stat.S_IMODE(env.entry(".wh.f").st.st_mode) == 0
    assert env.read("f") == b"1"


# -- changes ----------------------------------------------------------------------------------------------


def test_rmdir_of_a_directory_whose_lower_content_is_whited_out(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"d": {".wh.a": WH, ".wh.b": WH}, "e": {".wh.a": WH}},
                           {"d": {"a": "1", "b": {"x": "2"}}, "e": {"a": "1"}}])
    assert env.names("d") == set()
    env.union.rmdir(*env.parent("d"))
    assert env.resolve("d") is None
    assert is_whiteout(env.upper / "d")
    env.union.copy_up(env.entry("e"))  # merged with an upper directory first
    assert env.names("e") == set()
    env.union.rmdir(*env.parent("e"))
    assert env.resolve("e") is None
    assert is_whiteout(env.upper / "e")


def test_rename_over_a_directory_whose_lower_content_is_whited_out(aufs_env: Any) -> None:
    env = aufs_env(upper={"src": {"new": "n"}}, lowers=[{"d": {".wh.a": WH}}, {"d": {"a": "1"}}])
    env.union.rename(*env.parent("src"), *env.parent("d"))
    assert env.names("d") == {"new"}
    assert env.resolve("src") is None


def test_rename_onto_a_whited_out_name(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, "a": "moved"}, {"f": "old", "a": "below"}])
    env.union.rename(*env.parent("a"), *env.parent("f"))
    assert env.read("f") == b"moved"
    assert env.resolve("a") is None and is_whiteout(env.upper / "a")
    assert env.names() == {"f"}
    env.union.unlink(*env.parent("f"))
    assert env.resolve("f") is None
    assert not os.path.lexists(env.upper / "f")  # the lower marker still hides what is beneath
    assert env.names() == set()


def test_create_a_whited_out_name_again(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{".wh.f": WH, ".wh.d": WH}, {"f": "old", "d": {"x": "1"}}])
    root = env.entry("")
    fd, _ = env.union.create(root, b"f", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    os.write(fd, b"new")
    os.close(fd)
    env.union.mkdir(env.entry(""), b"d", stat.S_IFDIR | 0o755, 0, 0)
    assert env.read("f") == b"new"
    assert env.entry("d").dirs == (0,)
    assert env.names("d") == set()
    assert env.resolve("d/x") is None
    assert env.names() == {"f", "d"}
    env.union.unlink(*env.parent("f"))  # nothing beneath shows: no whiteout is needed
    assert env.resolve("f") is None
    assert not os.path.lexists(env.upper / "f")
    env.union.rmdir(*env.parent("d"))
    assert env.resolve("d") is None
    assert env.names() == set()


def test_copy_up_of_a_directory_holding_markers_copies_no_marker(aufs_env: Any) -> None:
    env = aufs_env(lowers=[{"d": {".wh.a": WH, ".wh..wh..opq": WH, ".wh..wh.plnk": {}, "b": "1", "s": {"t": "2"}}},
                           {"d": {"a": "2", "c": "3"}}])
    env.union.copy_up(env.entry("d/s/t"))
    env.union.copy_up(env.entry("d/b"))
    fd, _ = env.union.create(env.entry("d"), b"n", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    os.close(fd)
    assert sorted(os.listdir(env.upper / "d")) == ["b", "n", "s"]
    assert os.listdir(env.upper / "d" / "s") == ["t"]
    assert env.entry("d").dirs == (0, 1)  # the lower directory's marker still makes it opaque
    assert env.names("d") == {"b", "n", "s"}
    assert env.tree(ROOT) == {"d": "DIR", "d/b": b"1", "d/n": b"", "d/s": "DIR", "d/s/t": b"2"}
