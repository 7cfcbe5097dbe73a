"""The shim compiles with warnings as errors, exports libfuse's names at the version pyfuse3 binds and nothing
else, and the package's own build (setup.py) produces it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nativehelp import REPO, fuse_include_dirs

WRAPPED = {"fuse_session_new", "fuse_session_destroy", "fuse_reply_open", "fuse_reply_err", "fuse_reply_buf",
           "fuse_reply_attr", "fuse_reply_entry", "fuse_reply_create", "fuse_reply_write",
           "fuse_add_direntry_plus", "fuse_session_mount", "fuse_session_fd", "fuse_session_receive_buf"}


def dynamic_symbols(lib: Path) -> dict[str, str]:
    """Defined dynamic symbols -> their version, from ``objdump -T``."""
    out = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[1] == "g" and "*UND*" not in line:
            found[fields[-1]] = fields[-2]
    return found


def test_exports_libfuse_names_at_fuse_3_0_and_its_own_api_only(shim: Path) -> None:
    symbols = dynamic_symbols(shim)
    assert {name: symbols.get(name) for name in WRAPPED} == dict.fromkeys(WRAPPED, "FUSE_3.0")
    own = {name for name in symbols if name.startswith("unionfs_native_")}
    assert {"unionfs_native_version", "unionfs_native_counters", "unionfs_native_set"} <= own
    assert set(symbols) - own - WRAPPED <= {"FUSE_3.0", "UNIONFS_NATIVE_0.1"}  # the version definitions


def test_pyfuse3_binds_the_wrapped_names_at_fuse_3_0() -> None:
    """The premise of the shim: pyfuse3's module asks the dynamic linker for these names at FUSE_3.0."""
    pyfuse3 = pytest.importorskip("pyfuse3")
    out = subprocess.run(["objdump", "-T", pyfuse3.__file__], capture_output=True, text=True, check=True).stdout
    wanted = {line.split()[-1]: line.split()[-2] for line in out.splitlines() if "*UND*" in line and "fuse_" in line}
    for name in WRAPPED:
        assert wanted.get(name) == "(FUSE_3.0)", name


def test_needs_libfuse3(shim: Path) -> None:
    out = subprocess.run(["readelf", "-d", str(shim)], capture_output=True, text=True, check=True).stdout
    assert "[libfuse3.so.3]" in out  # dlvsym(RTLD_NEXT) finds libfuse through this dependency


def test_setup_py_builds_the_shim(tmp_path: Path, shim: Path) -> None:
    """``setup.py build_ext`` (what ``pip install`` runs) builds the library into the package."""
    assert fuse_include_dirs() is not None
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    built = list((tmp_path / "lib" / "unionfs" / "_native").glob("_shim*.so"))
    assert len(built) == 1, r.stderr
    assert set(dynamic_symbols(built[0])) >= WRAPPED


def test_setup_py_goes_on_without_headers(tmp_path: Path) -> None:
    """Without libfuse3's headers the build says why and succeeds, building nothing (unionfs then runs pure)."""
    code = (f"import sys; sys.argv = ['setup.py', '-q', 'build_ext', '--build-lib', {str(tmp_path / 'lib')!r}, "
            f"'--build-temp', {str(tmp_path / 'tmp')!r}]; import setup")
    env = {"PATH": "/nonexistent", "PYTHONPATH": str(REPO)}  # no pkg-config: the fallback directory is tried
    r = subprocess.run([sys.executable, "-c", code.replace("import setup", _no_headers_then_setup())],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "the native part (unionfs._native._shim) is not built" in r.stderr
    assert "libfuse3's headers" in r.stderr
    assert not list((tmp_path / "lib").rglob("_shim*.so"))


def _no_headers_then_setup() -> str:
    """Run setup.py with its fallback include directory pointing nowhere."""
    return ("import runpy, pathlib; src = pathlib.Path('setup.py').read_text()"
            ".replace('/usr/include/fuse3', '/nonexistent/fuse3'); exec(compile(src, 'setup.py', 'exec'), "
            "{'__name__': '__main__', '__file__': 'setup.py'})")

