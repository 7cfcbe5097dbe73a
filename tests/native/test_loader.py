"""The loader: the shim goes in front of libfuse only before pyfuse3 is imported, says why when it cannot, and
pyfuse3's fuse_session_new then reaches the shim (its counters say so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nativehelp import PY, REPO, fuse_unavailable, python, shim_env


def report(code: str, env: dict[str, str]) -> dict[str, object]:
    """Run ``code`` (which prints one JSON object last) in a fresh interpreter."""
    r = python(code, env)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout.splitlines()[-1]))


LOAD_THEN_PYFUSE3 = """
import ctypes, json
import unionfs._native as n
nat = n.load()
import pyfuse3
lib_addr = ctypes.cast(nat._lib.fuse_session_new, ctypes.c_void_p).value
global_addr = ctypes.cast(ctypes.CDLL(None).fuse_session_new, ctypes.c_void_p).value
print(json.dumps({"loaded": nat is not None, "reason": n.reason(), "version": nat.version(), "same": n.load() is nat,
                  "first": lib_addr == global_addr, "counters": nat.counters().session_new,
                  "conn": nat.connection() is None}))
"""


def test_load_before_pyfuse3_puts_the_shim_first(shim: Path) -> None:
    got = report(LOAD_THEN_PYFUSE3, shim_env(shim))
    assert got["loaded"] and got["reason"] == "" and got["same"]
    assert got["first"], "the global scope's fuse_session_new is not the shim's"
    assert got["counters"] == 0 and got["conn"]  # no session yet: nothing counted, no connection record
    assert str(got["version"]).startswith("unionfs-native ")
    assert "libfuse 3." in str(got["version"])


def test_pyfuse3_imported_first_is_refused(shim: Path) -> None:
    got = report("import json, pyfuse3, unionfs._native as n; nat = n.load(); "
                 "print(json.dumps({'nat': nat is None, 'reason': n.reason(), 'avail': n.available()}))",
                 shim_env(shim))
    assert got["nat"]
    assert got["reason"] == "pyfuse3 was imported before the native part"
    assert got["avail"]  # the library is there; it only came too late


def test_missing_library_is_reported_and_unionfs_runs_as_today(tmp_path: Path, shim: Path) -> None:
    env = shim_env(shim, UNIONFS_NATIVE_LIB=str(tmp_path / "none.so"))
    got = report("import json, unionfs._native as n; nat = n.load(); print(json.dumps({'nat': nat is None, "
                 "'reason': n.reason(), 'avail': n.available(), 'version': n.version()}))", env)
    assert got == {"nat": True, "reason": f"{tmp_path / 'none.so'} does not exist", "avail": False, "version": None}
    plain = subprocess.run([PY, "-m", "unionfs", "--version"], env=env, capture_output=True, text=True, cwd=REPO)
    wrapped = subprocess.run([PY, "-m", "unionfs._native.run", "--version"], env=env, capture_output=True, text=True,
                             cwd=REPO)
    assert wrapped.returncode == plain.returncode == 0
    assert wrapped.stdout == plain.stdout
    assert "native part not loaded" in wrapped.stderr


def test_a_file_that_is_no_shim_is_refused(tmp_path: Path, shim: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    got = report("import json, unionfs._native as n; print(json.dumps({'nat': n.load() is None, "
                 "'reason': n.reason()}))", shim_env(shim, UNIONFS_NATIVE_LIB=str(bogus)))
    assert got["nat"]
    assert str(got["reason"]).startswith(f"cannot open {bogus}")


def test_preloaded_shim_is_found(shim: Path) -> None:
    env = shim_env(shim, LD_PRELOAD=str(shim))
    del env["UNIONFS_NATIVE_LIB"]
    got = report("import json, pyfuse3, unionfs._native as n; nat = n.load(); "
                 "print(json.dumps({'path': nat.path if nat else n.reason()}))", env)
    assert got["path"] == "(preloaded)"


def test_options_and_plain_readdir_handles(shim: Path) -> None:
    got = report("""
import json, unionfs._native as n
nat = n.load()
before = [nat.cached_listings, nat.readdirplus_auto]
nat.set_cached_listings(True); nat.set_readdirplus_auto(True)
after = [nat.cached_listings, nat.readdirplus_auto]
bit = nat._plain_bit
print(json.dumps({"before": before, "after": after, "plain": nat.readdir_handle(7 | bit),
                  "plus": nat.readdir_handle(7)}))
""", shim_env(shim))
    assert got == {"before": [False, False], "after": [True, True], "plain": [7, True], "plus": [7, False]}


def test_regression_a_path_too_long_to_prefetch_is_skipped_not_the_end(tmp_path: Path, shim: Path) -> None:
    """unionfs_native_prefetch queues nothing while off; on, a path of PATH_MAX bytes or more is skipped and the
    records after it are still queued (it ended the list before), and the directories are read (counted)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    got = report(f"""
import json, os, time, unionfs._native as n
nat = n.load()
fd = os.open({str(tmp_path)!r}, os.O_PATH | os.O_DIRECTORY)
nat.layers([fd])
dirs = [(0, b"a"), (0, b"x" * 5000), (0, b"b")]
off = nat.prefetch_dirs(dirs)
nat.set_prefetch(True)
on = nat.prefetch_dirs(dirs)
deadline = time.monotonic() + 10
while nat.counters().dirs_prefetched < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({{"off": off, "on": on, "read": nat.counters().dirs_prefetched}}))
""", shim_env(shim))
    assert got == {"off": 0, "on": 2, "read": 2}


def test_environment_turns_options_on(shim: Path) -> None:
    got = report("import json, unionfs._native as n; nat = n.load(); "
                 "print(json.dumps({'cached': nat.cached_listings, 'auto': nat.readdirplus_auto}))",
                 shim_env(shim, UNIONFS_NATIVE_CONFIG="cache_dirs,readdirplus_auto"))
    assert got == {"cached": True, "auto": True}


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
def test_pyfuse3_session_goes_through_the_shim(tmp_path: Path, shim: Path) -> None:
    """pyfuse3.init calls fuse_session_new: the shim counts it and hands libfuse its own table."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    got = report(f"""
import json, unionfs._native as n
nat = n.load()
import pyfuse3
pyfuse3.init(pyfuse3.Operations(), {str(mnt)!r}, set(pyfuse3.default_options))
c = nat.counters()
pyfuse3.close(unmount=True)
print(json.dumps({{"new": c.session_new, "wrapped": c.session_wrapped}}))
""", shim_env(shim))
    assert got == {"new": 1, "wrapped": 1}


def test_module_is_importable_without_side_effects() -> None:
    """Importing unionfs._native loads nothing (only load() does)."""
    code = ("import sys, unionfs._native as n; print(n.loaded() is None, 'pyfuse3' in sys.modules, "
            "n.reason())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.split() == ["True", "False", "not", "loaded", "yet"]


SHOWN_NUMBERS = """
import json, random
import unionfs._native as n
nat = n.load()
rng = random.Random(SEED)
model, bad = {}, []
keys = [rng.randrange(1, 3000) for _ in range(600)]
for step in range(6000):
    ino = rng.choice(keys)
    shown = 0 if rng.random() < 0.45 else rng.choice([ino, rng.randrange(1, 1 << 62)])
    nat.show_numbers([(ino, shown)])
    if shown in (0, ino):
        model.pop(ino, None)
    else:
        model[ino] = shown
    if step % 500 == 0 or step == 5999:
        bad += [k for k in set(keys) if nat.shown_number(k) != model.get(k, k)]
print(json.dumps({"bad": bad[:10], "left": len(model)}))
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_table_of_shown_numbers_keeps_what_it_was_told(shim: Path, seed: int) -> None:
    """The shim's table of the numbers replies show in place of an inode's own (the other names of a hard-linked
    lower file): set, changed and removed at random over a few hundred clashing numbers, it answers each as
    a dictionary would (removal moves back the entries after the hole; growth rehashes)."""
    got = report(SHOWN_NUMBERS.replace("SEED", str(seed)), shim_env(shim))
    assert got["bad"] == [] and isinstance(got["left"], int) and got["left"] > 0
