"""Mount option parsing into MountSpec, and writing a MountSpec back as options."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unionfs.options import (
    DEFAULT_TIMEOUT,
    MountSpec,
    OptionError,
    escape_lowerdir,
    option_string,
    parse,
    render,
    spec_to_options,
    split_lowerdir,
    split_options,
)
from unionfs.ownership import IdMap, Ownership

BASE = "lowerdir=/l1:/l2,upperdir=/u,workdir=/w"


def test_parse_full_spec():
    spec = parse([BASE])
    assert spec.lowers == (b"/l1", b"/l2")
    assert spec.upper == b"/u" and spec.work == b"/w"
    assert spec.writable and not spec.readonly
    assert spec.layer_dirs() == (b"/u", b"/l1", b"/l2")
    assert spec.timeout == DEFAULT_TIMEOUT and spec.userxattr is None


def test_parse_lowerdir_only_is_read_only_stack():
    spec = parse(["lowerdir=/a"])
    assert spec.upper is None and not spec.writable
    assert spec.layer_dirs() == (b"/a",)


def test_lowerdir_colon_escape():
    spec = parse([r"lowerdir=/with\:colon:/plain"])
    assert spec.lowers == (b"/with:colon", b"/plain")


def test_lowerdir_backslash_escape():
    assert split_lowerdir(r"/a\\:/b") == ["/a\\", "/b"]
    assert parse([r"lowerdir=/a\\:/b"]).lowers == (b"/a\\", b"/b")


def test_lowerdir_escaped_comma():
    assert parse([r"lowerdir=/a\,b:/c"]).lowers == (b"/a,b", b"/c")


def test_lowerdir_relative_paths_become_absolute():
    spec = parse(["lowerdir=rel/dir"])
    assert spec.lowers == (os.fsencode(os.path.abspath("rel/dir")),)


@pytest.mark.parametrize("bad", ["lowerdir=", "lowerdir", "lowerdir=/a::/b", "lowerdir=/a:", "lowerdir=/a\\"])
def test_lowerdir_malformed(bad):
    with pytest.raises(OptionError):
        parse([bad])


def test_missing_lowerdir():
    with pytest.raises(OptionError, match="lowerdir"):
        parse(["upperdir=/u,workdir=/w"])


def test_later_options_override_earlier():
    spec = parse([BASE + ",ro", "lowerdir=/other", "rw"])
    assert spec.lowers == (b"/other",)
    assert not spec.readonly
    spec = parse(["lowerdir=/a,noatime,atime,timeout=5", "timeout=7,noatime"])
    assert spec.timeout == 7.0 and spec.atime is False


def test_later_option_in_same_text_overrides():
    spec = parse(["lowerdir=/a,userxattr,nouserxattr,fsname=one,fsname=two"])
    assert spec.userxattr is False and spec.fsname == "two"


def test_ro_makes_spec_read_only():
    spec = parse([BASE + ",ro"])
    assert spec.readonly and not spec.writable


def test_unknown_option_is_error():
    with pytest.raises(OptionError, match="unknown mount option"):
        parse([BASE + ",frobnicate"])


def test_upperdir_without_workdir_is_error():
    with pytest.raises(OptionError, match="together"):
        parse(["lowerdir=/l,upperdir=/u"])
    with pytest.raises(OptionError, match="together"):
        parse(["lowerdir=/l,workdir=/w"])


@pytest.mark.parametrize("opt", ["upperdir", "workdir", "upperdir="])
def test_upperdir_without_value_is_error(opt):
    with pytest.raises(OptionError):
        parse([f"lowerdir=/l,{opt}"])


@pytest.mark.parametrize(
    "opt",
    ["redirect_dir=off", "redirect_dir=nofollow", "index=off", "metacopy=off", "xino=off", "xino=auto",
     "nfs_export=off", "uuid=null", "uuid=on"],
)
def test_kernel_options_with_our_values_accepted(opt):
    assert parse([f"{BASE},{opt}"]).lowers == (b"/l1", b"/l2")


@pytest.mark.parametrize(
    "opt", ["redirect_dir=on", "redirect_dir=follow", "index=on", "metacopy=on", "xino=on", "nfs_export=on",
            "index", "uuid=weird"],
)
def test_kernel_options_with_other_values_rejected(opt):
    with pytest.raises(OptionError, match="not supported"):
        parse([f"{BASE},{opt}"])


@pytest.mark.parametrize(
    "opt", ["rw", "nodev", "nosuid", "noexec", "defaults", "_netdev", "nofail", "relatime", "noatime",
            "x-systemd.automount", "x-gvfs-hide", "default_permissions", "lazytime", "dirsync"],
)
def test_generic_flags_accepted(opt):
    spec = parse([f"{BASE},{opt}"])
    assert spec.upper == b"/u" and spec.writable


def test_generic_flag_with_value_is_error():
    with pytest.raises(OptionError):
        parse([f"{BASE},nodev=1"])


def test_userxattr_flags():
    assert parse([BASE + ",userxattr"]).userxattr is True
    assert parse([BASE + ",nouserxattr"]).userxattr is False


def test_atime_flags():
    assert parse([BASE + ",strictatime"]).atime is True
    assert parse([BASE]).atime is False


def test_allow_other_and_debug():
    spec = parse([BASE + ",allow_other,debug"])
    assert spec.allow_other is True and spec.debug is True


def test_prescan_flag():
    assert parse([BASE + ",prescan"]).prescan is True
    assert parse([BASE]).prescan is False
    with pytest.raises(OptionError):
        parse([BASE + ",prescan=yes"])


@pytest.mark.parametrize("value,ok", [("0", True), ("2.5", True), ("86400", True), ("-1", False),
                                      ("86401", False), ("soon", False)])
def test_timeout(value, ok):
    if ok:
        assert parse([f"{BASE},timeout={value}"]).timeout == float(value)
    else:
        with pytest.raises(OptionError, match="timeout"):
            parse([f"{BASE},timeout={value}"])


def test_fsname_and_escaped_comma():
    assert parse([BASE + r",fsname=my\,fs"]).fsname == "my,fs"
    with pytest.raises(OptionError):
        parse([BASE + ",fsname="])


def test_split_options():
    assert split_options("a,b,,c") == ["a", "b", "c"]
    assert split_options(r"a\,b,c") == ["a,b", "c"]
    assert split_options(r"x\:y") == [r"x\:y"]
    assert split_options("trail\\") == ["trail\\"]


def test_mountspec_is_frozen():
    spec = MountSpec(lowers=(b"/a",))
    with pytest.raises(AttributeError):
        spec.upper = b"/u"  # type: ignore[misc]


# -- writing: render(spec) is what parse reads back as spec -----------------------------------------------------

#: bytes a path component is made of: the option syntax's own characters, spaces, and bytes that are not UTF-8
AWKWARD = [b"a", b"Z", b"0", b"-", b".", b":", b",", b"\\", b"=", b" ", b"\t", b"\n", b"\xff", b"\xc3\xa9", b"#"]


@st.composite
def paths(draw: st.DrawFn, backslashes: bool = True) -> bytes:
    """An absolute path that os.path.abspath leaves as it is (no empty, "." or ".." component)."""
    alphabet = AWKWARD if backslashes else [c for c in AWKWARD if c != b"\\"]
    component = st.lists(st.sampled_from(alphabet), min_size=1, max_size=6).map(b"".join)
    parts = draw(st.lists(component.filter(lambda c: c not in (b".", b"..")), min_size=1, max_size=4))
    return b"/" + b"/".join(parts)


def idmaps() -> st.SearchStrategy[IdMap]:
    ids = st.integers(min_value=0, max_value=2**32)
    ranges = st.tuples(ids, ids, st.integers(min_value=1, max_value=2**16))
    return st.lists(ranges, min_size=1, max_size=3).map(lambda r: IdMap(tuple(r)))


def ownerships() -> st.SearchStrategy[Ownership]:
    ids = st.none() | st.integers(min_value=0, max_value=2**32)
    return st.builds(Ownership, uidmap=st.none() | idmaps(), gidmap=st.none() | idmaps(), squash_uid=ids,
                     squash_gid=ids, xattr_permissions=st.booleans())


@st.composite
def specs(draw: st.DrawFn, backslashes: bool = True) -> MountSpec:
    """Every MountSpec that parse can return (paths absolute and normalized, allow_other None or True)."""
    writable = draw(st.booleans())
    allow_root = draw(st.booleans())
    return MountSpec(
        lowers=tuple(draw(st.lists(paths(), min_size=1, max_size=5))),
        upper=draw(paths(backslashes)) if writable else None,
        work=draw(paths(backslashes)) if writable else None,
        readonly=draw(st.booleans()),
        userxattr=draw(st.sampled_from([None, True, False])),
        allow_other=None if allow_root else draw(st.sampled_from([None, True])),
        atime=draw(st.booleans()),
        timeout=draw(st.floats(min_value=0, max_value=86400) | st.just(DEFAULT_TIMEOUT)),
        fsname=draw(st.text(st.sampled_from("ab:,= é" + "\\" * backslashes), min_size=1, max_size=8)
                    | st.just("unionfs")),
        debug=draw(st.booleans()),
        ownership=draw(st.just(Ownership()) | ownerships()),
        prescan=draw(st.booleans()),
        allow_root=allow_root,
        auto_unmount=draw(st.booleans()),
        acl=draw(st.booleans()),
        aufs_markers=draw(st.booleans()),
        fsync=draw(st.booleans()),
        xattrs=draw(st.booleans()),
        context=draw(st.sampled_from([None, "system_u:object_r:tmp_t:s0",
                                      '"system_u:object_r:container_file_t:s0:c1,c2"'])),
        spare=draw(st.sampled_from([None, 60.0, 2.5])),
    )


#: a value split_options cannot give back: a backslash (of an odd run) before a comma, or at the end
INEXPRESSIBLE = re.compile(r"(?<!\\)(\\\\)*\\(,|\Z)")


def expressible(spec: MountSpec) -> bool:
    values = [os.fsdecode(p) for p in (spec.upper, spec.work) if p is not None] + [spec.fsname]
    return not any(INEXPRESSIBLE.search(v) for v in values)


@settings(max_examples=400, deadline=None)
@given(specs(backslashes=False))
def test_render_round_trip(spec: MountSpec) -> None:
    text = render(spec)
    assert parse([text]) == spec, text


@settings(max_examples=400, deadline=None)
@given(specs())
def test_render_round_trip_or_refusal_with_backslashes(spec: MountSpec) -> None:
    """Lowerdir paths escape their backslashes; other values cannot, and render refuses the inexpressible."""
    if expressible(spec):
        assert parse([render(spec)]) == spec
    else:
        with pytest.raises(OptionError, match="backslash"):
            render(spec)


@given(st.lists(paths(), min_size=1, max_size=5))
def test_lowerdir_paths_of_any_bytes_round_trip(lowers: list[bytes]) -> None:
    assert [os.fsencode(p) for p in split_lowerdir(escape_lowerdir(lowers))] == lowers
    assert parse([option_string([f"lowerdir={escape_lowerdir(lowers)}"])]).lowers == tuple(lowers)


def test_spec_to_options_leaves_defaults_out_in_a_fixed_order() -> None:
    assert spec_to_options(MountSpec(lowers=(b"/a",))) == ["lowerdir=/a"]
    spec = MountSpec(lowers=(b"/a:b", b"/c\\d", b"/e,f"), upper=b"/u,1", work=b"/w", readonly=True, userxattr=False)
    assert spec_to_options(spec) == ["lowerdir=/a\\:b:/c\\\\d:/e,f", "upperdir=/u,1", "workdir=/w", "ro", "nouserxattr"]
    assert render(spec) == "lowerdir=/a\\:b:/c\\\\d:/e\\,f,upperdir=/u\\,1,workdir=/w,ro,nouserxattr"
    squashed = parse(["lowerdir=/a,squash_to_root,uidmapping=0:100:10:10:200:5,timeout=2.5"])
    assert spec_to_options(squashed) == ["lowerdir=/a", "timeout=2.5", "uidmapping=0:100:10:10:200:5",
                                         "squash_to_uid=0", "squash_to_gid=0"]


def test_render_refuses_what_no_option_expresses() -> None:
    with pytest.raises(OptionError, match="allow_other"):
        render(MountSpec(lowers=(b"/a",), allow_other=False))
    with pytest.raises(OptionError, match="uidmapping"):
        render(MountSpec(lowers=(b"/a",), ownership=Ownership(uidmap=IdMap(()))))
    with pytest.raises(OptionError, match="backslash"):
        render(MountSpec(lowers=(b"/a",), upper=b"/u\\", work=b"/w"))
    with pytest.raises(OptionError, match="backslash"):
        option_string(["fsname=x\\,y"])


def test_option_string_escapes_commas() -> None:
    assert option_string(["lowerdir=/a,b", "ro"]) == "lowerdir=/a\\,b,ro"
    assert option_string(["rw", "rbind"]) == "rw,rbind"
    assert split_options(option_string(["upperdir=/x\\y,z", "a=b"])) == ["upperdir=/x\\y,z", "a=b"]


def test_later_options_apply_on_top_of_a_rendered_spec() -> None:
    """What ``unionfs snapshot mount -o ...`` does: the user's options after the snapshot's."""
    spec = MountSpec(lowers=(b"/l",), upper=b"/u", work=b"/w", userxattr=True)
    assert parse([render(spec), "ro,timeout=5"]) == MountSpec(lowers=(b"/l",), upper=b"/u", work=b"/w",
                                                              userxattr=True, readonly=True, timeout=5.0)
    assert parse([render(spec), "lowerdir=/other"]).lowers == (b"/other",)


# -- FUSE and fuse-overlayfs options, lowerdir+= ---------------------------------------------------------------


def test_regression_fuse_options_accepted() -> None:
    """allow_root, auto_unmount and noacl have a meaning here and are accepted (they were refused)."""
    spec = parse(["lowerdir=/a,allow_root,auto_unmount,noacl"])
    assert (spec.allow_root, spec.auto_unmount, spec.acl) == (True, True, False)
    defaults = parse(["lowerdir=/a"])
    assert (defaults.allow_root, defaults.auto_unmount, defaults.acl) == (False, False, True)
    with pytest.raises(OptionError, match="allow_root and allow_other"):
        parse(["lowerdir=/a,allow_root,allow_other"])


@pytest.mark.parametrize("opt", ["nonempty", "static_nlink", "threaded=0", "threaded=1", "subtype=unionfs"])
def test_regression_no_effect_options_accepted(opt: str) -> None:
    assert parse([f"lowerdir=/a,{opt}"]) == parse(["lowerdir=/a"])


@pytest.mark.parametrize(("opt", "reason"), [("subtype=other", "fuse.unionfs"), ("threaded=2", "0 or 1"),
                                             ("datadir+=/d", "metacopy"), ("nonempty=1", "unknown"),
                                             ("max_read=65536", "cannot agree"),
                                             ("static_nlink=1", "unknown")])
def test_regression_refused_options_named_with_reason(opt: str, reason: str) -> None:
    with pytest.raises(OptionError, match=reason) as info:
        parse([f"lowerdir=/a,{opt}"])
    assert opt in str(info.value)


def test_regression_lowerdir_plus_appends_a_layer() -> None:
    """lowerdir+= adds one layer below those before it, its path taken as it is (colons included)."""
    assert parse(["lowerdir+=/a,lowerdir+=/b:c", "lowerdir+=/d\\,e"]).lowers == (b"/a", b"/b:c", b"/d,e")
    with pytest.raises(OptionError, match="lowerdir\\+= cannot follow lowerdir="):
        parse(["lowerdir=/a,lowerdir+=/b"])
    with pytest.raises(OptionError, match="lowerdir\\+"):
        parse(["lowerdir+="])


def test_regression_repeated_lowerdir_replaces_as_in_the_kernel() -> None:
    """A later lowerdir= replaces every lower layer given before it, lowerdir+= ones too (the kernel does the
    same: -o lowerdir=A,lowerdir=B mounts B alone); documented in `unionfs mount --help`."""
    assert parse(["lowerdir=/a:/b,lowerdir=/c"]).lowers == (b"/c",)
    assert parse(["lowerdir+=/a,lowerdir+=/b,lowerdir=/c"]).lowers == (b"/c",)
    assert parse(["lowerdir+=/a,lowerdir=/c,upperdir=/u,workdir=/w"]).lowers == (b"/c",)


# -- containers/storage and fuse-overlayfs ---------------------------------------------------------------------


def test_containers_storage_option_string() -> None:
    """What containers/storage passes its mount program: an empty field, volatile, mappings with a leading
    colon, squash_to_uid/gid, xattr_permissions=2, and well over 100 absolute lower layers (near 8 KiB)."""
    lowers = [f"/var/lib/containers/storage/overlay/{i:064x}/diff" for i in range(110)]
    text = (f"lowerdir={':'.join(lowers)},upperdir=/s/u,workdir=/s/w,,volatile,"
            "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,squash_to_uid=0,squash_to_gid=0,"
            "xattr_permissions=2")
    assert len(text) > 8000
    spec = parse([text])
    assert [os.fsdecode(p) for p in spec.lowers] == lowers
    assert (spec.upper, spec.work, spec.fsync) == (b"/s/u", b"/s/w", False)
    own = spec.ownership
    assert own.uidmap == own.gidmap == IdMap(((0, 100000, 65536),))
    assert (own.squash_uid, own.squash_gid, own.xattr_permissions) == (0, 0, True)


@pytest.mark.parametrize("opt, field, value", [
    ("volatile", "fsync", False), ("fsync=0", "fsync", False), ("fsync=1", "fsync", True),
    ("noxattrs=1", "xattrs", False), ("noxattrs=0", "xattrs", True), ("aufs_markers", "aufs_markers", True),
    ("aufs_markers,noaufs_markers", "aufs_markers", False), ("noacl", "acl", False), ("debug", "debug", True),
    ("timeout=5", "timeout", 5.0), ('context="system_u:object_r:container_file_t:s0:c1,c2"', "context",
                                    '"system_u:object_r:container_file_t:s0:c1,c2"'),
])
def test_fuse_overlayfs_options_take_its_meaning(opt: str, field: str, value: object) -> None:
    assert getattr(parse([f"lowerdir=/a,{opt},ro"]), field) == value


@pytest.mark.parametrize("opt", ["threaded=1", "threaded=0", "fast_ino=1", "writeback=0", "plugins=",
                                 "static_nlink", "squash_to_root", "xattr_permissions=0", "redirect_dir=off"])
def test_fuse_overlayfs_options_accepted(opt: str) -> None:
    assert parse([f"lowerdir=/a,{opt}"]).lowers == (b"/a",)


@pytest.mark.parametrize("opt, reason", [
    ("plugins=/usr/libexec/fuse-overlayfs/plugins.so", "loads no plugins"),
    ("writeback=1", "writeback cache"), ("fsync=2", "0 or 1"), ("noxattrs=yes", "0 or 1"),
    ("rootcontext=x", "only context="), ("context=", "needs a value"),
])
def test_fuse_overlayfs_options_refused_with_a_reason(opt: str, reason: str) -> None:
    with pytest.raises(OptionError, match=reason):
        parse([f"lowerdir=/a,{opt}"])


def test_xattr_permissions_zero_turns_it_off() -> None:
    assert not parse(["lowerdir=/a,xattr_permissions=2,xattr_permissions=0"]).ownership.xattr_permissions


def test_a_quoted_value_keeps_its_commas_and_round_trips() -> None:
    context = '"system_u:object_r:container_file_t:s0:c1,c2"'
    assert split_options(f"lowerdir=/a,context={context},ro") == ["lowerdir=/a", f"context={context}", "ro"]
    spec = parse([f"lowerdir=/a,context={context}"])
    assert parse([render(spec)]) == spec
    # a quote that does not open the value is an ordinary character
    assert split_options('fsname=a"b,ro') == ['fsname=a"b', "ro"]


@pytest.mark.parametrize("opt, idle", [("spare", 60.0), ("spare=2.5", 2.5), ("spare=86400", 86400.0)])
def test_spare_takes_an_idle_time(opt: str, idle: float) -> None:
    assert parse([f"lowerdir=/a,{opt}"]).spare == idle
    assert parse(["lowerdir=/a"]).spare is None


@pytest.mark.parametrize("opt", ["spare=0", "spare=-1", "spare=x", "spare=86401"])
def test_spare_refuses_a_bad_idle_time(opt: str) -> None:
    with pytest.raises(OptionError, match="spare"):
        parse([f"lowerdir=/a,{opt}"])


@pytest.mark.parametrize("text", ['lowerdir=/l,context="a,upperdir=/u,workdir=/w', 'lowerdir=/l,context="'])
def test_regression_an_unterminated_quote_is_refused(text: str) -> None:
    """(regression: it swallowed the options after it, here the upper and work directories)"""
    with pytest.raises(OptionError, match="unterminated"):
        parse([text])


def test_regression_only_a_quote_right_after_the_keys_equals_sign_opens_a_value() -> None:
    assert split_options('lowerdir=/a="b,ro') == ['lowerdir=/a="b', "ro"]
    with pytest.raises(OptionError, match="needs a value"):
        parse(['lowerdir=/a,context=""'])


def test_regression_fusermount3_gets_the_comma_of_a_context_escaped() -> None:
    """fusermount3 splits its options on every comma a backslash does not escape (regression: a context of an
    SELinux category pair, ``s0:c1,c2``, reached it split in two)."""
    from unionfs.fuse import kernel

    text = kernel.fusermount_options({"default_permissions", 'context="u:r:t:s0:c1,c2"', "fsname=unionfs"})
    assert text == 'rw,nosuid,nodev,context="u:r:t:s0:c1\\,c2",default_permissions,fsname=unionfs'
