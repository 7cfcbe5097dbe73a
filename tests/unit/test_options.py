"""Mount option parsing into MountSpec."""

from __future__ import annotations

import os

import pytest

from unionfs.options import DEFAULT_TIMEOUT, MountSpec, OptionError, parse, split_lowerdir, split_options

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
