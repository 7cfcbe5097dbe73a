"""Filters of :meth:`Snapshotter.walk`, in the syntax of containerd's filters.

A filter is a comma-separated list of selectors that must all match; a snapshot passes :func:`matcher` when
any of the given filters matches (no filters: everything passes). A selector is ``FIELD``, true when the field
is present and not empty, or ``FIELD OP VALUE`` with OP one of ``==``, ``!=`` and ``~=`` (a Python regular
expression searched in the field). FIELD is ``name``, ``kind``, ``parent`` or ``labels.KEY``; KEY (and VALUE)
may be written in double quotes, with ``\\"`` and ``\\\\`` escapes, when they hold dots, commas or spaces::

    kind==committed
    labels."unionfs.io/role"==base,parent!=""
    name~=^build-
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from ._errors import InvalidArgument
from ._types import Info

FIELDS = ("name", "kind", "parent")


@dataclasses.dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""
    regex: re.Pattern[str] | None = None

    def field(self, info: Info) -> str | None:
        if self.path == ("name",):
            return info.name
        if self.path == ("kind",):
            return info.kind.value
        if self.path == ("parent",):
            return info.parent
        return info.labels.get(self.path[1])

    def matches(self, info: Info) -> bool:
        got = self.field(info)
        if self.op is None:
            return bool(got)
        if self.path == ("kind",) and got is not None:  # kinds compare without regard to case
            got, want = got.lower(), self.value.lower()
        else:
            want = self.value
        if self.op == "==":
            return (got or "") == want
        if self.op == "!=":
            return (got or "") != want
        assert self.regex is not None
        return got is not None and self.regex.search(got) is not None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {why} at position {self.pos + 1}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def spaces(self) -> None:
        while self.peek() in (" ", "\t"):
            self.pos += 1

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                nxt = self.peek()
                if not nxt:
                    raise self.fail("unterminated quoted string")
                self.pos += 1
                out.append(nxt)
            else:
                out.append(ch)

    def field_part(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        start = self.pos
        while self.peek() and (self.peek().isalnum() or self.peek() in "_-/"):
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a field name")
        return self.text[start : self.pos]

    def selector(self) -> Selector:
        self.spaces()
        parts = [self.field_part()]
        while self.peek() == ".":
            self.pos += 1
            parts.append(self.field_part())
        path = tuple(parts)
        if not (len(path) == 1 and path[0] in FIELDS or len(path) == 2 and path[0] == "labels" and path[1]):
            raise InvalidArgument(
                f"filter {self.text!r}: unknown field {'.'.join(path)!r} (fields: name, kind, parent, labels.KEY)"
            )
        self.spaces()
        if not self.peek() or self.peek() == ",":
            return Selector(path)
        op = self.peek(2)
        if op not in ("==", "!=", "~="):
            raise self.fail("expected ==, != or ~=")
        self.pos += 2
        self.spaces()
        if self.peek() == '"':
            value = self.quoted()
        else:
            start = self.pos
            while self.peek() and self.peek() != ",":
                self.pos += 1
            value = self.text[start : self.pos].rstrip()
        regex = None
        if op == "~=":
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise InvalidArgument(f"filter {self.text!r}: bad regular expression {value!r}: {exc}") from None
        self.spaces()
        return Selector(path, op, value, regex)

    def parse(self) -> list[Selector]:
        if not self.text.strip():
            raise InvalidArgument("empty filter")
        out = [self.selector()]
        while self.peek() == ",":
            self.pos += 1
            out.append(self.selector())
        if self.pos != len(self.text):
            raise self.fail("unexpected text")
        return out


def parse(text: str) -> list[Selector]:
    """The selectors of one filter (all must match); InvalidArgument when the text is malformed."""
    return _Parser(text).parse()


def matcher(filters: Iterable[str]) -> Callable[[Info], bool]:
    """A predicate true for snapshots matching any of ``filters`` (everything when there are none)."""
    parsed = [parse(f) for f in filters]
    if not parsed:
        return lambda _info: True
    return lambda info: any(all(s.matches(info) for s in sel) for sel in parsed)
