"""``unionfs explore`` driven headless through textual's pilot, on a stack of three layer directories: the
layer list and its figures, the tree as of the selected layer with its marks, "changes only", the inspect
panel, help, quitting; a directory of 10,000 entries opened in chunks; and the command line (its refusals
without a terminal, with a target naming nothing)."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import images as im
import pytest
from layers import build, dir_, reg
from textual.widgets import DataTable, Static, Tree
from textual.widgets.tree import TreeNode

from unionfs import cli, explore
from unionfs.explore import ExploreApp, _Panel
from unionfs.explore_model import ExploreModel, Mark
from unionfs.image import _images
from unionfs.snapshots import Snapshotter
from unionfs.targets import from_image, from_layers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are made with mknod (root)")


def _tree(root: Path, spec: dict[str, Any]) -> Path:
    """``spec``: name -> bytes (a file), dict (a directory), or None (a whiteout)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, node in spec.items():
        p = root / name
        if node is None:
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        elif isinstance(node, dict):
            _tree(p, node)
        else:
            p.write_bytes(node)
    return root


@pytest.fixture
def stack(tmp_path: Path) -> ExploreModel:
    """Three layers, lowest first: a base; ``etc/motd`` added and ``etc/passwd`` changed; ``tmp`` removed."""
    base = _tree(tmp_path / "base", {"etc": {"passwd": b"root", "hosts": b"h"}, "tmp": {"junk": b"j" * 9},
                                     "usr": {"lib": {"x": b"x"}}})
    second = _tree(tmp_path / "second", {"etc": {"motd": b"hello", "passwd": b"root:x"}})
    third = _tree(tmp_path / "third", {"tmp": None})
    return ExploreModel.from_target(from_layers([str(third), str(second), str(base)]))


def _run(model: ExploreModel, body: Callable[[ExploreApp, Any], Awaitable[None]], **kw: Any) -> None:
    async def go() -> None:
        app = ExploreApp(model, title="layers test", **kw)
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.pause()
            await body(app, pilot)

    asyncio.run(go())


def _lines(node: TreeNode[Any], depth: int = 0) -> list[str]:
    """The labels under ``node`` (the nodes made so far), indented by depth."""
    out = []
    for child in node.children:
        out.append("  " * depth + child.label.plain)
        out += _lines(child, depth + 1)
    return out


def _label(app: ExploreApp, path: bytes) -> Any:
    """The label (rich Text) of the tree node of ``path``."""
    tree = app.query_one("#tree", Tree)
    todo = list(tree.root.children)
    while todo:
        node = todo.pop()
        if node.data == path:
            return node.label
        todo += node.children
    raise AssertionError(f"{path!r} is not in the tree")


def _styles(text: Any) -> set[str]:
    return {str(span.style) for span in text.spans}


async def _select(app: ExploreApp, pilot: Any, path: bytes) -> None:
    """Move the tree's cursor to the node of ``path`` (with the keys), the tree focused."""
    tree = app.query_one("#tree", Tree)
    if app.focused is not tree:
        await pilot.press("tab")
    for _ in range(40):
        node = tree.cursor_node
        if node is not None and node.data == path:
            return
        if node is not None and path.startswith(node.data + b"/") and not node.is_expanded:
            await pilot.press("right")
        else:
            await pilot.press("down")
    raise AssertionError(f"{path!r} not reached")


def test_layers_listed_and_layer_2_shows_its_changes(stack: ExploreModel) -> None:
    async def body(app: ExploreApp, pilot: Any) -> None:
        table = app.query_one("#layers", DataTable)
        rows = [[table.get_cell_at((r, c)).plain for c in range(6)] for r in range(table.row_count)]
        assert [r[0] for r in rows] == ["1", "2", "3"]
        assert [r[3:] for r in rows] == [["8", "0", "0"], ["1", "1", "0"], ["0", "0", "2"]]
        assert app.layer == 0
        assert all(line.lstrip().startswith("+") for line in _lines(app.query_one("#tree", Tree).root))

        await pilot.press("down")  # layer 2
        assert app.layer == 1
        assert "as of layer 2 of 3" in str(app.query_one("#status", Static).render())
        await _select(app, pilot, b"etc/motd")  # (opens etc)
        motd = _label(app, b"etc/motd")
        assert motd.plain.startswith("+ motd") and "green" in _styles(motd)
        passwd = _label(app, b"etc/passwd")
        assert passwd.plain.startswith("~ passwd") and "yellow" in _styles(passwd)
        assert _label(app, b"etc/hosts").plain.startswith("  hosts")
        assert _label(app, b"usr").plain.startswith("  usr/")
        assert "layer 2 of 3" in str(app.query_one("#details", Static).render())

        await pilot.press("tab")  # back to the layers
        assert app.focused is app.query_one("#layers", DataTable)
        await pilot.press("down")  # layer 3: tmp and tmp/junk removed, struck through
        await pilot.pause()
        assert app.layer == 2
        tmp = _label(app, b"tmp")
        assert tmp.plain.startswith("- tmp/") and "red strike" in _styles(tmp)
        assert _label(app, b"etc/motd").plain.startswith("  motd")  # (unchanged now: added beneath)

    _run(stack, body)


def test_changes_only_hides_unchanged_entries(stack: ExploreModel) -> None:
    async def body(app: ExploreApp, pilot: Any) -> None:
        tree = app.query_one("#tree", Tree)
        await pilot.press("c")
        await pilot.pause()
        assert app.changes_only and "changes of this layer only" in str(app.query_one("#status", Static).render())
        assert [line.split("  [")[0] for line in _lines(tree.root)] == ["  etc/", "  + motd  5 B", "  ~ passwd  6 B"]
        await pilot.press("c")  # back: every entry
        await pilot.pause()
        shown = {line.split("  [")[0].strip() for line in _lines(tree.root)}
        assert {"  hosts  1 B".strip(), "  tmp/".strip(), "  usr/".strip()} <= shown

    _run(stack, body, layer=1)


def test_inspect_shows_the_layer_of_the_selected_entry(stack: ExploreModel) -> None:
    async def body(app: ExploreApp, pilot: Any) -> None:
        await pilot.press("down")  # layer 2
        await pilot.pause()
        await _select(app, pilot, b"etc/hosts")
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, _Panel)
        text = app.screen.body.plain
        assert text.startswith("etc/hosts  regular file, 1 bytes")
        assert "from      layer #1 lower 3" in text and "#1 is layer 1" in text
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, _Panel)

        await _select(app, pilot, b"etc/passwd")
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, _Panel)
        text = app.screen.body.plain
        assert "from      layer #0 lower 2" in text and "shadows   #1 lower 3" in text
        await pilot.press("i")  # the key that opened it closes it
        await pilot.pause()
        assert not isinstance(app.screen, _Panel)

    _run(stack, body)


def test_help_and_quit(stack: ExploreModel) -> None:
    async def body(app: ExploreApp, pilot: Any) -> None:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, _Panel) and "changes of the selected layer" in app.screen.body.plain
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0 and not app.is_running

    _run(stack, body)


def test_open_directories_stay_open_from_layer_to_layer(stack: ExploreModel) -> None:
    async def body(app: ExploreApp, pilot: Any) -> None:
        await _select(app, pilot, b"usr")
        await pilot.press("enter")  # opens usr
        await pilot.pause()
        assert "lib/" in " ".join(_lines(app.query_one("#tree", Tree).root))
        await pilot.press("tab", "down")  # back to the layers: layer 2
        await pilot.pause()
        assert app.layer == 1
        assert "    lib/" in [line.split("  [")[0] for line in _lines(app.query_one("#tree", Tree).root)]

    _run(stack, body)


def test_reload_reads_what_was_written_meanwhile(tmp_path: Path) -> None:
    low = _tree(tmp_path / "low", {"etc": {"a": b"1"}})
    up = _tree(tmp_path / "up", {})
    model = ExploreModel.from_target(from_layers([str(low)], str(up)))

    async def body(app: ExploreApp, pilot: Any) -> None:
        await pilot.press("down")  # the upper layer: nothing changed yet
        assert app.layer == 1 and app.view.counts()[Mark.MODIFIED] == 0
        await pilot.press("tab", "right")
        await pilot.pause()
        assert _label(app, b"etc/a").plain.startswith("  a")
        _tree(up, {"etc": {"a": b"22", "b": b"3"}})  # a copy-up and a new file, as a mount writes them
        await pilot.press("r")
        await pilot.pause()
        assert app.layer == 1
        assert _label(app, b"etc/a").plain.startswith("~ a  2 B")  # (etc is still open)
        assert _label(app, b"etc/b").plain.startswith("+ b")
        table = app.query_one("#layers", DataTable)
        assert [table.get_cell_at((1, c)).plain for c in (3, 4, 5)] == ["1", "1", "0"]

    _run(model, body)


def test_a_big_directory_is_made_in_chunks(tmp_path: Path) -> None:
    n = 10_000
    big = tmp_path / "big" / "many"
    big.mkdir(parents=True)
    for i in range(n):
        (big / f"f{i:05}").write_bytes(b"")
    model = ExploreModel.from_target(from_layers([str(tmp_path / "big")]))

    async def body(app: ExploreApp, pilot: Any) -> None:
        tree = app.query_one("#tree", Tree)
        many = tree.root.children[0]
        assert many.data == b"many" and not many.children  # not made before it is opened
        start = time.monotonic()
        await _select(app, pilot, b"many")
        await pilot.press("enter")
        await pilot.pause()
        assert len(many.children) == explore.CHUNK + 1
        assert many.children[-1].label.plain == f"... {n - explore.CHUNK} more (enter)"
        await pilot.press("end", "enter")  # the next thousand
        await pilot.pause()
        assert len(many.children) == 2 * explore.CHUNK + 1
        assert many.children[explore.CHUNK].data == b"many/f01000"
        assert time.monotonic() - start < 10

    _run(model, body)


def test_the_command_needs_a_terminal_and_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = _tree(tmp_path / "l", {"a": b"1"})
    assert cli.main(["explore", "--layers", str(layer)]) == 1  # (pytest's stdout is no terminal)
    assert "needs a terminal" in capsys.readouterr().err
    assert cli.main(["explore", "--layers", str(tmp_path / "missing")]) == 3
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["explore", "--layers", str(layer), "--layer", "2"])
    assert exc.value.code == 2 and "has layers 1 to 1" in capsys.readouterr().err
    assert "explore" in cli._usage()


# -- an imported image -------------------------------------------------------------------------------------------

IMAGE_LAYERS = [
    [dir_("etc"), reg("etc/passwd", b"p" * 10), dir_("data"), reg("data/a", b"a" * 20), reg("data/b", b"b")],
    [dir_("etc"), reg("etc/.wh.passwd"), reg("etc/group", b"g" * 3)],
    [dir_("data"), reg("data/.wh..wh..opq"), reg("data/c", b"c" * 4)],
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("explore")
    built = im.image([build(entries) for entries in IMAGE_LAYERS])
    layout = im.write_oci_layout(tmp / "layout", [("hand:1", built)])
    with Snapshotter(tmp / "store") as sn:
        _images.import_image(sn, layout, name="hand:1")
    return tmp / "store"


def test_an_image_its_layers_by_digest_and_an_opaque_directory(store: Path) -> None:
    target = from_image("hand:1", str(store))
    model = ExploreModel.from_target(target)

    async def body(app: ExploreApp, pilot: Any) -> None:
        table = app.query_one("#layers", DataTable)
        labels = [table.get_cell_at((r, 1)).plain for r in range(3)]
        digests = [la.digest for la in reversed(target.layers)]
        assert all(d is not None for d in digests)
        assert labels == [f"layer {i + 1}/3 {str(d).partition(':')[2][:12]}" for i, d in enumerate(digests)]
        assert digests[2] in str(app.query_one("#details", Static).render())
        assert [table.get_cell_at((r, 5)).plain for r in range(3)] == ["0", "1", "2"]  # removed
        tree = app.query_one("#tree", Tree)
        # as of layer 3, changes only: data opaque (~) with data/a and data/b removed, data/c added
        assert [line.split("  [")[0] for line in _lines(tree.root)] == [
            "~ data/", "  - a  20 B", "  - b  1 B", "  + c  4 B"]
        await _select(app, pilot, b"data/a")
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, _Panel)
        text = app.screen.body.plain
        assert text.startswith("data/a  absent: below the opaque directory data of layer #0")
        assert "#0 is layer 3" in text

    _run(model, body, layer=2, changes_only=True)


def test_the_command_resolves_its_target(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a terminal (the app's run() recorded instead of taking the terminal)."""
    ran: list[tuple[int, bool, str, int]] = []

    def run(self: ExploreApp) -> None:
        ran.append((self.layer, self.changes_only, self.stack_title, len(self.model)))

    monkeypatch.setattr(ExploreApp, "run", run)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert cli.main(["explore", "hand:1", "--root", str(store), "--layer", "2", "--changes"]) == 0
    assert cli.main(["explore", "--image", "hand:1", "--root", str(store)]) == 0
    assert ran == [(1, True, "image hand:1", 3), (0, False, "image hand:1", 3)]
