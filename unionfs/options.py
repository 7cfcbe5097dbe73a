"""Mount options: parsed into a frozen :class:`MountSpec` shared by the CLIs and the server, and written back.

The syntax is the kernel's and fuse-overlayfs's: ``lowerdir=L1:L2:...,upperdir=U,workdir=W`` (the leftmost
lowerdir is the top-most lower layer, ``\\:`` escapes a colon and ``\\\\`` a backslash inside a lowerdir
path, ``\\,`` a comma inside any value; ``lowerdir+=DIR`` adds one layer below the others, and a later
``lowerdir=`` replaces the layers given before, as in the kernel), plus the generic options that ``mount(8)``
and ``mount.fuse3`` add and the FUSE options that have a meaning here.
:func:`parse` reads them; :func:`render` writes a MountSpec back, so that ``parse([render(spec)]) == spec`` for
every spec that :func:`parse` returns.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from .ownership import IdMap, IdMapError, Ownership, parse_idmap


class OptionError(ValueError):
    """A malformed or unknown mount option; the message is one line meant for the user."""


#: Generic VFS options that mount(8)/mount.fuse3 pass along; they do not change our behaviour (the FUSE mount
#: is always ``nodev``/``nosuid`` for non-root mounters and the kernel enforces exec flags itself).
GENERIC_FLAGS = frozenset(
    {
        "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync", "auto", "noauto",
        "user", "nouser", "users", "owner", "group", "defaults", "_netdev", "nofail", "lazytime",
        "nolazytime", "silent", "loud", "dirsync", "mand", "nomand", "iversion", "noiversion",
        "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
        "nodiratime",
    }
)

#: Kernel overlayfs options whose value we accept only where it names what we do anyway.
KERNEL_FIXED = {
    "redirect_dir": frozenset({"off", "nofollow"}),
    "index": frozenset({"off"}),
    "metacopy": frozenset({"off"}),
    "xino": frozenset({"off", "auto"}),
    "nfs_export": frozenset({"off"}),
    "uuid": frozenset({"on", "off", "null", "auto"}),
}

#: Options of FUSE and of fuse-overlayfs that are accepted and change nothing here, with the reason (``unionfs
#: mount --help`` lists them). A value, where the option takes one, must be one of those given.
NO_EFFECT: dict[str, tuple[frozenset[str] | None, str]] = {
    "nonempty": (None, "FUSE 3 always mounts on a directory that is not empty"),
    "static_nlink": (None, "a merged directory already shows a link count of 1"),
    "threaded": (frozenset({"0", "1"}), "the server answers requests in one event loop either way"),
    "subtype": (frozenset({"unionfs"}), "a unionfs mount is always of type fuse.unionfs"),
    "fast_ino": (frozenset({"0", "1"}), "inode numbers are unionfs's own, stable across copy-up, either way"),
    "writeback": (frozenset({"0"}), "the kernel's writeback cache stays off"),
    "plugins": (frozenset({""}), "no plugins given"),
}

#: Options known but refused, with the reason.
REFUSED = {
    "datadir+": "data-only lower layers need metacopy, which unionfs does not do",
    "max_read": "the kernel would be told a limit the server cannot agree to at its start (libfuse then ends "
                "the session)",
    "subtype": "a unionfs mount is always of type fuse.unionfs (unionfs umount and mount -t fuse.unionfs "
               "rely on it); only subtype=unionfs is accepted",
    "threaded": "threaded takes 0 or 1",
    "fast_ino": "fast_ino takes 0 or 1",
    "writeback": "unionfs does not turn on the kernel's writeback cache (writes reach the server as they are "
                 "made); only writeback=0 is accepted",
    "plugins": "unionfs loads no plugins (fuse-overlayfs's lazy-fetching lower layers); only an empty "
               "plugins= is accepted",
}

#: SELinux options, passed to the kernel as they are (``context="..."``: a comma inside the quotes is kept).
SELINUX_OPTIONS = ("context", "fscontext", "defcontext", "rootcontext")

DEFAULT_TIMEOUT = 300.0
DEFAULT_SPARE_IDLE = 60.0
DEFAULT_FSNAME = "unionfs"


@dataclasses.dataclass(frozen=True)
class MountSpec:
    """Everything a mount needs, validated for syntax (not yet against the file system)."""

    lowers: tuple[bytes, ...]
    upper: bytes | None = None
    work: bytes | None = None
    readonly: bool = False
    #: None: choose by what the upper filesystem allows; True/False: forced by ``-o userxattr``/``-o nouserxattr``
    userxattr: bool | None = None
    allow_other: bool | None = None
    atime: bool = False
    timeout: float = DEFAULT_TIMEOUT
    fsname: str = DEFAULT_FSNAME
    debug: bool = False
    ownership: Ownership = Ownership()
    #: resolve the lower layers once at mount (unionfs.prescan)
    prescan: bool = False
    #: FUSE's allow_root: root may use the mount besides its owner (excludes allow_other)
    allow_root: bool = False
    #: FUSE's auto_unmount: fusermount3 unmounts when the server dies
    auto_unmount: bool = False
    #: whether the kernel checks POSIX ACLs (False: ``-o noacl``, access by the mode bits alone)
    acl: bool = True
    #: honour AUFS-style markers in lower layers (``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` makes its
    #: directory opaque), as fuse-overlayfs does; on when started as containers/storage's mount program
    aufs_markers: bool = False
    #: whether fsync reaches the disk (False: ``volatile`` or ``fsync=0``, as fuse-overlayfs and the kernel)
    fsync: bool = True
    #: whether extended attributes are served (False: fuse-overlayfs's ``noxattrs=1``)
    xattrs: bool = True
    #: the SELinux context of every object (``context=``), passed to the kernel as it is
    context: str | None = None
    #: keep a spare server that has loaded pyfuse3 and trio for the next mount, for so many idle seconds
    #: (``spare[=SECONDS]``; unionfs.fuse.spare)
    spare: float | None = None
    #: write a line for each union decision (``trace[=FILE]``, unionfs.trace): to ``trace_file`` when given
    #: (appended), else to the server's log; a ``trace_file`` implies ``trace``
    trace: bool = False
    trace_file: bytes | None = None
    #: serve through the native part beneath pyfuse3 when it loads (False: ``-o nonative``, the pure mode;
    #: unionfs.fuse.native)
    native: bool = True

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.readonly

    def layer_dirs(self) -> tuple[bytes, ...]:
        """All layer directories, top-most first (the upper, when there is one, then the lowers)."""
        top = (self.upper,) if self.upper is not None else ()
        return top + self.lowers


def split_lowerdir(value: str) -> list[str]:
    """Split a lowerdir list on ``:`` honouring ``\\:`` and ``\\\\`` escapes."""
    parts: list[str] = []
    cur: list[str] = []
    it = iter(value)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise OptionError("lowerdir ends with a lone backslash")
            cur.append(nxt)
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def split_options(text: str) -> list[str]:
    """Split ``-o`` text on commas; a backslash escapes a comma inside a value, and so does a value in double
    quotes that begins right after the ``=`` (SELinux's ``context="user:role:type:s0:c1,c2"``)."""
    out: list[str] = []
    cur: list[str] = []
    escaped = False
    quoted = False
    for ch in text:
        if quoted:
            cur.append(ch)
            quoted = ch != '"'
        elif escaped:
            cur.append("\\" + ch if ch != "," else ",")
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"' and cur and cur[-1] == "=" and "=" not in cur[:-1]:
            cur.append(ch)
            quoted = True
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if escaped:
        cur.append("\\")
    if quoted:
        raise OptionError(f"unterminated quoted value: {''.join(cur)!r}")
    out.append("".join(cur))
    return [o for o in out if o]


def _absolute_path(path: str, what: str) -> bytes:
    if not path:
        raise OptionError(f"{what} is empty")
    return os.fsencode(os.path.abspath(path))


#: Options without a value that set one MountSpec field: option -> (field, value).
_FLAGS: dict[str, tuple[str, bool]] = {
    "ro": ("readonly", True), "rw": ("readonly", False),
    "userxattr": ("userxattr", True), "nouserxattr": ("userxattr", False),
    "allow_other": ("allow_other", True), "allow_root": ("allow_root", True),
    "auto_unmount": ("auto_unmount", True), "noacl": ("acl", False),
    "atime": ("atime", True), "relatime": ("atime", True), "strictatime": ("atime", True),
    "noatime": ("atime", False),
    "debug": ("debug", True), "prescan": ("prescan", True),
    "aufs_markers": ("aufs_markers", True), "noaufs_markers": ("aufs_markers", False),
    "volatile": ("fsync", False),
    "native": ("native", True), "nonative": ("native", False),
}


#: The option that writes each (field, value) of :data:`_FLAGS`: the first one that sets it.
_FLAG_OPTIONS = {setting: option for option, setting in reversed(_FLAGS.items())}


def _seconds(value: str, key: str, zero: bool = False) -> float:
    try:
        t = float(value)
    except ValueError:
        raise OptionError(f"{key} needs a number of seconds, not {value!r}") from None
    if not (0 if zero else 0.001) <= t <= 86400:
        raise OptionError(f"{key} must be between {0 if zero else 0.001} and 86400 seconds, not {value}")
    return t


def _no_effect(key: str, sep: str, value: str) -> bool:
    """Whether ``key[=value]`` is one of the options accepted without effect (:data:`NO_EFFECT`)."""
    if key not in NO_EFFECT:
        return False
    values = NO_EFFECT[key][0]
    return not sep if values is None else bool(sep) and value in values


def parse(option_texts: list[str]) -> MountSpec:
    """Parse every ``-o`` argument (later ones override earlier ones) into a MountSpec."""
    kw: dict[str, object] = {}
    owner_kw: dict[str, object] = {}
    lowers: list[bytes] | None = None
    #: whether the lower layers were given by lowerdir= (which lowerdir+= may not follow, as in the kernel)
    listed = False
    for text in option_texts:
        for opt in split_options(text):
            key, sep, value = opt.partition("=")
            if key == "lowerdir":
                # As the kernel: a later lowerdir= replaces the lower layers given before it.
                if not sep or not value:
                    raise OptionError("lowerdir needs at least one directory: lowerdir=DIR[:DIR...]")
                parts = split_lowerdir(value)
                if any(not p for p in parts):
                    raise OptionError(f"lowerdir has an empty entry: {value!r}")
                lowers = [_absolute_path(p, "lowerdir") for p in parts]
                listed = True
            elif key == "lowerdir+":
                # One layer, below those given before; its path as it is (a colon is no separator here).
                if not sep or not value:
                    raise OptionError("lowerdir+ needs a directory: lowerdir+=DIR")
                if listed:
                    raise OptionError("lowerdir+= cannot follow lowerdir= (as in the kernel): give every layer "
                                      "with lowerdir+=, or all of them in one lowerdir=")
                lowers = [*(lowers or []), _absolute_path(value, "lowerdir+")]
            elif key in ("upperdir", "workdir"):
                if not sep:
                    raise OptionError(f"{key} needs a value: {key}=DIR")
                kw["upper" if key == "upperdir" else "work"] = _absolute_path(value, key)
            elif key in _FLAGS and not sep:
                field, flag_value = _FLAGS[key]
                kw[field] = flag_value
            elif _no_effect(key, sep, value):
                continue
            elif key in REFUSED:
                raise OptionError(f"{opt}: not supported: {REFUSED[key]}")
            elif key == "timeout":
                kw["timeout"] = _seconds(value, key, zero=True)
            elif key in ("uidmapping", "gidmapping"):
                try:
                    owner_kw["uidmap" if key == "uidmapping" else "gidmap"] = parse_idmap(value, key)
                except IdMapError as exc:
                    raise OptionError(str(exc)) from None
            elif key == "squash_to_root" and not sep:
                owner_kw["squash_uid"] = owner_kw["squash_gid"] = 0
            elif key in ("squash_to_uid", "squash_to_gid"):
                if not value.isdigit():
                    raise OptionError(f"{key} needs a numeric id, not {value!r}")
                owner_kw["squash_uid" if key == "squash_to_uid" else "squash_gid"] = int(value)
            elif key == "xattr_permissions":
                if value not in ("", "0", "1", "2"):
                    raise OptionError(f"xattr_permissions takes 0, 1 or 2 (or no value), not {value!r}")
                owner_kw["xattr_permissions"] = value != "0"
            elif key in ("fsync", "noxattrs"):
                if value not in ("0", "1"):
                    raise OptionError(f"{key} takes 0 or 1, not {value!r}")
                if key == "fsync":
                    kw["fsync"] = value == "1"
                else:
                    kw["xattrs"] = value == "0"
            elif key == "spare":
                kw["spare"] = _seconds(value, key) if sep else DEFAULT_SPARE_IDLE
            elif key == "trace":
                if sep and not value:
                    raise OptionError("trace= needs a file: trace=FILE (or trace alone, for the server's log)")
                kw["trace"] = True
                kw["trace_file"] = _absolute_path(value, key) if sep else None
            elif key in SELINUX_OPTIONS:
                if value.strip('"') == "":
                    raise OptionError(f"{key} needs a value: {key}=CONTEXT")
                if key != "context":
                    raise OptionError(f"{opt}: not supported: unionfs passes only context= to the kernel")
                kw["context"] = value
            elif key == "fsname":
                if not value:
                    raise OptionError("fsname needs a value")
                kw["fsname"] = value
            elif key in KERNEL_FIXED:
                if value not in KERNEL_FIXED[key]:
                    allowed = "|".join(sorted(KERNEL_FIXED[key]))
                    raise OptionError(f"{opt}: not supported; unionfs accepts only {key}={allowed}")
            elif key in GENERIC_FLAGS and not sep or key.startswith("x-") or key == "default_permissions":
                continue
            else:
                raise OptionError(f"unknown mount option {opt!r} (see 'unionfs mount --help')")
    if lowers is None:
        raise OptionError("missing lowerdir=DIR[:DIR...]: at least one lower layer is required")
    upper = kw.get("upper")
    work = kw.get("work")
    if (upper is None) != (work is None):
        raise OptionError("upperdir and workdir go together: give both for a writable mount, or neither")
    if kw.get("allow_root") and kw.get("allow_other"):
        raise OptionError("allow_root and allow_other exclude each other: give one")
    if owner_kw:
        kw["ownership"] = Ownership(**owner_kw)  # type: ignore[arg-type]
    return MountSpec(lowers=tuple(lowers), **kw)  # type: ignore[arg-type]


# -- writing -------------------------------------------------------------------------------------------------


def escape_lowerdir(paths: Iterable[bytes]) -> str:
    """The value of ``lowerdir=`` for ``paths`` (top-most first): ``\\`` and ``:`` escaped as
    :func:`split_lowerdir` expects (commas are escaped later, by :func:`option_string`)."""
    return ":".join(os.fsdecode(p).replace("\\", "\\\\").replace(":", "\\:") for p in paths)


def _idmap_value(idmap: IdMap, what: str) -> str:
    if not idmap.ranges:
        raise OptionError(f"{what} without ranges cannot be written as a mount option")
    return ":".join(f"{stored}:{shown}:{count}" for stored, shown, count in idmap.ranges)


_DEFAULT_SPEC = MountSpec(lowers=())


def spec_to_options(spec: MountSpec) -> list[str]:
    """The options that :func:`parse` reads back as ``spec``, one per item, in the form :func:`split_options`
    returns them (join them with :func:`option_string`). Options at their default are left out.

    OptionError for what no option expresses (``allow_other=False``, an id mapping without ranges)."""
    opts = [f"lowerdir={escape_lowerdir(spec.lowers)}"]
    if spec.upper is not None:
        opts.append(f"upperdir={os.fsdecode(spec.upper)}")
    if spec.work is not None:
        opts.append(f"workdir={os.fsdecode(spec.work)}")
    for field in dict.fromkeys(field for field, _value in _FLAGS.values()):
        value = getattr(spec, field)
        if value == getattr(_DEFAULT_SPEC, field):
            continue
        option = _FLAG_OPTIONS.get((field, value))
        if option is None:
            raise OptionError(f"{field}={value!r} cannot be written as a mount option (leave it at its default)")
        opts.append(option)
    if spec.timeout != DEFAULT_TIMEOUT:
        opts.append(f"timeout={spec.timeout!r}")
    if spec.fsname != DEFAULT_FSNAME:
        opts.append(f"fsname={spec.fsname}")
    owner = spec.ownership
    if owner.uidmap is not None:
        opts.append(f"uidmapping={_idmap_value(owner.uidmap, 'uidmapping')}")
    if owner.gidmap is not None:
        opts.append(f"gidmapping={_idmap_value(owner.gidmap, 'gidmapping')}")
    if owner.squash_uid is not None:
        opts.append(f"squash_to_uid={owner.squash_uid}")
    if owner.squash_gid is not None:
        opts.append(f"squash_to_gid={owner.squash_gid}")
    if owner.xattr_permissions:
        opts.append("xattr_permissions")
    if not spec.xattrs:
        opts.append("noxattrs=1")
    if spec.context is not None:
        opts.append(f"context={spec.context}")
    if spec.spare is not None:
        opts.append("spare" if spec.spare == DEFAULT_SPARE_IDLE else f"spare={spec.spare!r}")
    if spec.trace_file is not None:
        opts.append(f"trace={os.fsdecode(spec.trace_file)}")
    elif spec.trace:
        opts.append("trace")
    return opts


def option_string(options: Iterable[str]) -> str:
    """Join options into one ``-o`` argument, a comma inside an option escaped as ``\\,``.

    OptionError for an option :func:`split_options` would not give back as it is: one with a backslash that
    stands before a comma or at its end (outside a lowerdir path, which escapes its backslashes), such as an
    upperdir path ending in a backslash."""
    texts = []
    for opt in options:
        _key, sep, value = opt.partition("=")
        quoted = bool(sep) and len(value) > 1 and value[0] == value[-1] == '"' and '"' not in value[1:-1]
        text = opt if quoted else opt.replace(",", "\\,")
        if split_options(text + ",") != ([opt] if opt else []):  # (as it reads with an option after it)
            raise OptionError(f"mount option {opt!r} cannot be written: a backslash before a comma or at the end")
        texts.append(text)
    return ",".join(texts)


def render(spec: MountSpec) -> str:
    """``spec`` as one ``-o`` argument: ``parse([render(spec)]) == spec``."""
    return option_string(spec_to_options(spec))
