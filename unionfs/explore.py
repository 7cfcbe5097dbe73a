"""The ``unionfs explore`` command: a terminal browser of a stack in the spirit of dive, drawn by textual.

Left, the layers (lowest first, numbered from 1 as ``unionfs layers`` numbers them) with their size and the
entries each adds, modifies and removes, and below them the selected layer's details; right, the merged
view as of the selected layer (that layer and those beneath it), its entries marked as that layer changed
them: ``+`` added (green), ``~`` modified (yellow), ``-`` removed (red, struck through). ``c`` shows only
what the layer changed (and the directories holding it), ``i`` what ``unionfs inspect`` says of the
selected entry, ``?`` the keys, ``q`` quits. It needs no mouse, so it works in any terminal, over ssh too.

The model (what is shown) is :mod:`unionfs.explore_model`; this module only draws it. The tree is built as
it is opened: a directory's entries are made when it is expanded, a thousand at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static, Tree
from textual.widgets.tree import TreeNode

from . import __version__, targets
from .cli_errors import EXIT_FAILED, run_command
from .explain import lines_of
from .explore_model import ROOT, ExploreModel, LayerView, Mark, Node
from .image._feedback import human_bytes
from .layers_cli import add_target_arguments, target_of

PROG = "unionfs explore"
#: the exit status of a target that names nothing (as for ``unionfs layers``)
EXIT_NOT_FOUND = 3
#: how many entries of a directory the tree makes at a time
CHUNK = 1000
#: how many lines "changes only" may make opening the directories holding changes
OPEN_BUDGET = 200

_STYLE = {Mark.ADDED: "green", Mark.MODIFIED: "yellow", Mark.REMOVED: "red strike", Mark.UNCHANGED: ""}
_SIGN = {Mark.ADDED: "+", Mark.MODIFIED: "~", Mark.REMOVED: "-", Mark.UNCHANGED: " "}

_HELP = """\
unionfs explore: the layers of a stack, and its merged view as of the selected layer

  up / down      select a layer (in the list of layers) or an entry (in the tree)
  tab            switch between the list of layers and the tree
  enter / right  open a directory of the tree (left closes it)
  c              show only the changes of the selected layer (and the directories holding them)
  i              what `unionfs inspect` says of the selected entry, in the stack as of the selected layer
  r              read the layers again (what a live mount wrote meanwhile)
  ?              this help
  q              quit (escape closes a panel)

Marks: + added (new in the view), ~ modified (a new copy of what the layers beneath show),
       - removed (hidden by a whiteout, an opaque directory, or a directory replaced by a file).
Each entry shows its size and the layer its copy comes from, e.g. [2].
"""


def _name(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def entry_label(node: Node) -> Text:
    """The line of ``node`` in the tree: its mark, name (a directory's with ``/``), size and layer."""
    style = _STYLE[node.mark]
    text = Text(f"{_SIGN[node.mark]} ", style=style.replace(" strike", ""))
    text.append(_name(node.name) + ("/" if node.is_dir else ""), style=style)
    extra = f"  {human_bytes(node.size)}" if node.kind == "file" else ""
    text.append(f"{extra}  [{node.layer + 1}]", style="dim")
    return text


@dataclasses.dataclass(frozen=True)
class _More:
    """The last line of a directory made in part: enter makes its next entries."""

    parent: bytes
    offset: int


_Data = bytes | _More


class _Panel(ModalScreen[None]):
    """Text in a box over the screen, closed by escape, q, or the key that opened it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss_panel", "close")]
    DEFAULT_CSS = """
    _Panel { align: center middle; }
    _Panel > VerticalScroll { width: 90%; height: auto; max-height: 90%; border: round $accent;
                              background: $surface; padding: 0 1; }
    """

    def __init__(self, title: str, body: Text, close_key: str) -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.close_key = close_key

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title = self.title_text
            yield Static(self.body, id="panel-body")

    def on_key(self, event: events.Key) -> None:
        if event.key == self.close_key:
            event.stop()
            self.dismiss(None)

    def action_dismiss_panel(self) -> None:
        self.dismiss(None)


class EntryTree(Tree[_Data]):
    """The tree of the view, with the keys of a file manager besides Tree's own: right opens a directory (or goes
    to its first entry), left closes it (or goes to its directory)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("right", "open_or_down", "open", show=False),
        Binding("left", "close_or_up", "close", show=False),
    ]

    def action_open_or_down(self) -> None:
        node = self.cursor_node
        if node is None or not node.allow_expand:
            return
        if node.is_expanded and node.children:
            self.move_cursor(node.children[0])
        else:
            node.expand()

    def action_close_or_up(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded:
            node.collapse()
        elif node.parent is not None and node.parent is not self.root:
            self.move_cursor(node.parent)


class ExploreApp(App[None]):
    """The browser of ``model``, starting at layer ``layer`` (0: the lowest; default the lowest), showing only
    the changes of the selected layer when ``changes_only``."""

    TITLE = "unionfs explore"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("c", "toggle_changes", "changes only"),
        Binding("i", "inspect", "inspect"),
        Binding("r", "reload", "reload"),
        Binding("question_mark", "help", "help"),
    ]
    CSS = """
    Screen { layout: horizontal; }
    #left { width: 45%; min-width: 40; }
    #layers { height: 1fr; border: round $panel; }
    #layers:focus { border: round $accent; }
    #details { height: auto; max-height: 50%; border: round $panel; padding: 0 1; }
    #right { width: 1fr; }
    #status { height: 1; padding: 0 1; background: $panel; }
    #tree { height: 1fr; border: round $panel; }
    #tree:focus { border: round $accent; }
    """

    def __init__(self, model: ExploreModel, *, title: str = "", layer: int = 0, changes_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.stack_title = title
        self.layer = max(0, min(layer, len(model) - 1))
        self.changes_only = changes_only
        self.view: LayerView = model.view(self.layer)
        self._filled: set[int] = set()  # the ids of the tree nodes whose entries were made
        self._expanded: set[bytes] = set()  # the directories open in the tree (kept from layer to layer)

    # -- building --------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Vertical(id="left"):
            yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
            yield Static(id="details")
        with Vertical(id="right"):
            yield Static(id="status")
            tree = EntryTree("/", data=ROOT, id="tree")
            tree.show_root = False
            tree.auto_expand = True
            yield tree
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.stack_title
        table: DataTable[Any] = self.query_one("#layers", DataTable)
        table.border_title = self.stack_title or "layers"
        table.add_column("#", key="index")
        table.add_column("layer", key="label")
        table.add_column(Text("size", justify="right"), key="size")
        table.add_column(Text("+", style="green", justify="right"), key="added")
        table.add_column(Text("~", style="yellow", justify="right"), key="modified")
        table.add_column(Text("-", style="red", justify="right"), key="removed")
        self._fill_table(table)
        table.move_cursor(row=self.layer)
        table.focus()
        self._show_layer()

    def _fill_table(self, table: DataTable[Any]) -> None:
        for f in self.model.analysis.layers:
            table.add_row(Text(str(f.index), justify="right"), Text(f.label + (" (w)" if f.writable else "")),
                          Text(human_bytes(f.size), justify="right"), Text(str(f.added.count), justify="right"),
                          Text(str(f.modified.count), justify="right"), Text(str(f.removed.count), justify="right"),
                          key=str(f.index - 1))

    def _show_layer(self) -> None:
        self.view = self.model.view(self.layer)
        f = self.model.figures(self.layer)
        counts = self.view.counts()
        lines = Text()
        lines.append(f"layer {f.index} of {len(self.model)}: {f.label}\n", style="bold")
        if f.digest:
            lines.append(f"digest    {f.digest}\n")
        lines.append(f"directory {f.path}{' (writable)' if f.writable else ''}\n")
        lines.append(f"size      {human_bytes(f.size)} ({f.size} B) in {f.entries} entries\n")
        lines.append(f"added     {counts[Mark.ADDED]} ({human_bytes(f.added.bytes)})\n", style="green")
        same = f", {f.unchanged.count} unchanged" if f.unchanged.count else ""
        lines.append(f"modified  {counts[Mark.MODIFIED]} ({human_bytes(f.modified.bytes)}, replacing "
                     f"{human_bytes(f.replaced_bytes)}{same})\n", style="yellow")
        lines.append(f"removed   {counts[Mark.REMOVED]} ({human_bytes(f.removed.bytes)})", style="red")
        a = self.model.analysis
        lines.append(f"\nstack     {human_bytes(a.total_size)}, wasted {human_bytes(a.wasted_bytes)}, "
                     f"efficiency {100 * a.efficiency:.2f} %", style="dim")
        details = self.query_one("#details", Static)
        details.update(lines)
        details.border_title = f"layer {f.index}"
        self._rebuild_tree()

    def _status(self) -> str:
        what = "changes of this layer only" if self.changes_only else "all entries (c: changes only)"
        label = self.model.infos[self.layer].label
        return f"as of layer {self.layer + 1} of {len(self.model)} ({label}): {what}"

    def _rebuild_tree(self) -> None:
        self.query_one("#status", Static).update(self._status())
        tree: Tree[_Data] = self.query_one("#tree", Tree)
        cursor = tree.cursor_node
        keep = cursor.data if cursor is not None and isinstance(cursor.data, bytes) else None
        tree.clear()
        self._filled = {tree.root.id}
        self._fill(tree.root, ROOT, 0)
        if self.changes_only:
            self._open_changes(tree.root)
        found = self._reopen(tree.root, keep)
        if found is None and tree.root.children:
            found = tree.root.children[0]
        if found is not None:
            self.call_after_refresh(tree.move_cursor, found)

    def _open_changes(self, root: TreeNode[_Data]) -> None:
        """Open the directories holding changes, the shallowest first, while that makes fewer than
        :data:`OPEN_BUDGET` lines."""
        made = len(root.children)
        todo = list(root.children)
        while todo:
            node = todo.pop(0)
            if not isinstance(node.data, bytes) or not node.allow_expand or node.id in self._filled:
                continue
            more = len(self.view.children(node.data, True))
            if made + more > OPEN_BUDGET:
                break
            self._fill(node, node.data, 0)
            node.expand()
            made += more
            todo += node.children

    def _reopen(self, node: TreeNode[_Data], keep: bytes | None) -> TreeNode[_Data] | None:
        """Open again the directories under ``node`` that were open; the node of path ``keep``, if made."""
        found = None
        for child in node.children:
            if not isinstance(child.data, bytes):
                continue
            if child.data == keep:
                found = child
            if child.data in self._expanded and child.allow_expand:
                self._fill(child, child.data, 0)
                child.expand()
                inner = self._reopen(child, keep)
                found = found or inner
        return found

    def _fill(self, node: TreeNode[_Data], path: bytes, offset: int) -> None:
        """Make the entries of directory ``path`` under ``node``, from the ``offset``-th, :data:`CHUNK` of them."""
        self._filled.add(node.id)
        entries = self.view.children(path, self.changes_only)
        for entry in entries[offset: offset + CHUNK]:
            if self.view.has_children(entry.path, self.changes_only):
                node.add(entry_label(entry), data=entry.path)
            else:
                node.add_leaf(entry_label(entry), data=entry.path)
        rest = len(entries) - offset - CHUNK
        if rest > 0:
            node.add_leaf(Text(f"... {rest} more (enter)", style="italic"), data=_More(path, offset + CHUNK))

    # -- events ----------------------------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row != self.layer and 0 <= event.cursor_row < len(self.model):
            self.layer = event.cursor_row
            self._show_layer()

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[_Data]) -> None:
        node = event.node
        if isinstance(node.data, bytes):
            self._expanded.add(node.data)
            if node.id not in self._filled:
                self._fill(node, node.data, 0)

    def on_tree_node_collapsed(self, event: Tree.NodeCollapsed[_Data]) -> None:
        if isinstance(event.node.data, bytes):
            self._expanded.discard(event.node.data)

    def on_tree_node_selected(self, event: Tree.NodeSelected[_Data]) -> None:
        more = event.node.data
        if isinstance(more, _More) and event.node.parent is not None:
            parent = event.node.parent
            event.node.remove()
            self._fill(parent, more.parent, more.offset)

    # -- actions ---------------------------------------------------------------------------------------------

    def action_toggle_changes(self) -> None:
        self.changes_only = not self.changes_only
        self._rebuild_tree()

    def action_reload(self) -> None:
        """Read the layers again (what a live mount wrote meanwhile), keeping the layer, the open directories
        and the entry under the cursor."""
        self.model.reload()
        table: DataTable[Any] = self.query_one("#layers", DataTable)
        layer = self.layer
        table.clear()
        self._fill_table(table)
        table.move_cursor(row=layer)
        self.layer = layer
        self._show_layer()

    def selected_path(self) -> bytes | None:
        """The path of the entry under the tree's cursor (None: no entry)."""
        node = self.query_one("#tree", Tree).cursor_node
        return node.data if node is not None and isinstance(node.data, bytes) else None

    def action_inspect(self) -> None:
        path = self.selected_path()
        if path is None:
            path = ROOT
        shown = "/" + _name(path)
        try:
            data = self.model.explain(self.layer, path)
        except (OSError, ValueError) as exc:
            body = Text(f"{shown}: {exc}", style="red")
        else:
            body = Text("\n".join(lines_of(data)))
            k = self.layer + 1
            names = ", ".join(f"#{la['index']} is layer {k - la['index']}" for la in data["layers"])
            body.append(f"\n\nthe stack as of layer {k} of {len(self.model)}, numbered from its top"
                        + (f": {names}" if names else ""), style="dim")
        self.push_screen(_Panel(f"inspect {shown}", body, "i"))

    def action_help(self) -> None:
        self.push_screen(_Panel("keys", Text(_HELP), "question_mark"))


# -- the command -------------------------------------------------------------------------------------------------

_DESCRIPTION = f"""\
Browse a stack in the terminal, as dive does: the layers on the left, the merged view as of the selected
layer on the right, its entries marked as that layer changed them (+ added, ~ modified, - removed).

  {PROG} busybox                      an image of the store (--root DIR)
  {PROG} --snapshot KEY               a snapshot and its parents (an active one's layer on top)
  {PROG} --layers L1:L2 [--upper U]   layer directories, top-most first (as lowerdir=)
  {PROG} /mnt/b                       a live unionfs mount, its writable layer included

Keys: up/down select, tab switches between layers and tree, enter opens a directory, c shows only the
changes of the selected layer, i inspects the selected entry (as `unionfs inspect`), r reads the layers
again, ? helps, q quits. No mouse is needed. For the same figures without a terminal: `unionfs layers`.

exit status: 0 success, 1 failure (no terminal), 2 bad usage, 3 the image, snapshot or directory is not
             found, 130 interrupted
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    add_target_arguments(p)
    p.add_argument("--layer", type=int, metavar="N", help="start at layer N (1: the lowest, the default)")
    p.add_argument("--changes", action="store_true", help="start showing only the changes of the layer")
    return p


def _run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:

    try:
        target = target_of(args, p)
    except targets.TargetError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if not target.layers:
        print(f"{PROG}: error: {target.kind} {target.name}: a stack of no layers", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.layer is not None and not 1 <= args.layer <= len(target.layers):
        p.error(f"--layer {args.layer}: the stack has layers 1 to {len(target.layers)}")
    try:
        tty = sys.stdout.isatty() and sys.stdin.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        print(f"{PROG}: error: needs a terminal (for the same figures as text: unionfs layers)", file=sys.stderr)
        return EXIT_FAILED
    model = ExploreModel.from_target(target)
    model.analysis  # (read before the terminal is taken)  # noqa: B018
    layer = args.layer - 1 if args.layer is not None else 0
    ExploreApp(model, title=f"{target.kind} {target.name}", layer=layer, changes_only=args.changes).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unionfs explore ARGV...``; returns the exit status."""
    p = parser()
    args = p.parse_args(sys.argv[2:] if argv is None else list(argv))
    os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")  # (ssh: no time lost drawing what moves)
    return run_command(PROG, lambda: _run(args, p))
