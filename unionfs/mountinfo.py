"""The mount table of this process, read from ``/proc/self/mountinfo``.

Each line describes one mount::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)  (4)     (5)         (6)       (7)   (8) (9)    (10)         (11)

mount id, parent id, major:minor, root of the mount within its filesystem, mount point, per-mount options,
zero or more optional fields (``shared:N``, ``master:N``, ...), a ``-``, filesystem type, source and
superblock options. The kernel writes a space, tab, newline and backslash inside a field as the octal escapes
``\\040``, ``\\011``, ``\\012`` and ``\\134`` (and a comma inside an option value as ``\\054``); the values here
are unescaped, and stay bytes.
"""

from __future__ import annotations

import dataclasses
import re

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL_ESCAPE = re.compile(rb"\\([0-3][0-7][0-7])")


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of the mount table, every text field unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    #: the directory of the filesystem that is mounted (``/`` unless a subtree is bind-mounted)
    root: bytes
    mount_point: bytes
    #: per-mount options (``rw``, ``nosuid``, ``relatime``, ...)
    options: tuple[bytes, ...]
    #: ``shared:N``, ``master:N``, ``propagate_from:N``, ``unbindable``
    optional_fields: tuple[bytes, ...]
    fstype: bytes
    source: bytes
    #: options of the filesystem (the superblock)
    super_options: tuple[bytes, ...]


def unescape(field: bytes) -> bytes:
    """A field as it is, without the kernel's ``\\NNN`` octal escapes."""
    if b"\\" not in field:
        return field
    return _OCTAL_ESCAPE.sub(lambda m: bytes((int(m.group(1), 8),)), field)


def _option_list(field: bytes) -> tuple[bytes, ...]:
    return tuple(unescape(opt) for opt in field.split(b",")) if field else ()


def parse_line(line: bytes) -> MountEntry:
    """One line of mountinfo (with or without its newline); ValueError when it is not one."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        separator = fields.index(b"-", 6)
    except ValueError:
        raise ValueError(f"not a mountinfo line (no ' - ' after the sixth field): {line!r}") from None
    if len(fields) != separator + 4:
        raise ValueError(f"not a mountinfo line (not three fields after ' - '): {line!r}")
    major, colon, minor = fields[2].partition(b":")
    if not colon:
        raise ValueError(f"not a mountinfo line (no major:minor): {line!r}")
    fstype, source, super_options = fields[separator + 1 :]
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major),
        minor=int(minor),
        root=unescape(fields[3]),
        mount_point=unescape(fields[4]),
        options=_option_list(fields[5]),
        optional_fields=tuple(fields[6:separator]),
        fstype=unescape(fstype),
        source=unescape(source),
        super_options=_option_list(super_options),
    )


def parse(text: bytes) -> list[MountEntry]:
    """Every line of a mountinfo text, in order (the last mount on a mount point is the visible one)."""
    # (split on newlines only: the kernel leaves a carriage return in a path as it is)
    return [parse_line(line) for line in text.split(b"\n") if line]


def read(path: str = MOUNTINFO) -> list[MountEntry]:
    """The mount table of this process (``path`` for another one, such as ``/proc/PID/mountinfo``)."""
    with open(path, "rb") as f:
        return parse(f.read())
