"""Builds the native shim (unionfs/_native/shim.c) with the package; everything else is in pyproject.toml.

The shim is optional: without a C compiler or libfuse3's headers the build says so and goes on, and unionfs runs
in its pure mode.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = "unionfs/_native"


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        return []
    r = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


def _include_dirs() -> list[str]:
    dirs = [flag[2:] for flag in _pkg_config("--cflags-only-I") if flag.startswith("-I")]
    return dirs or ["/usr/include/fuse3"]


class OptionalBuildExt(build_ext):
    """Builds the shim if it can; says why not otherwise, without failing the install."""

    def build_extension(self, ext: Extension) -> None:
        if not any((Path(d) / "fuse_lowlevel.h").exists() for d in ext.include_dirs):
            self._skip(ext, "libfuse3's headers (fuse_lowlevel.h) are missing: install libfuse3-dev")
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # a missing compiler or linker, or a compile error
            self._skip(ext, f"{type(e).__name__}: {e}")

    def _skip(self, ext: Extension, why: str) -> None:
        print(f"unionfs: the native part ({ext.name}) is not built, unionfs will run without it: {why}",
              file=sys.stderr)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a plain shared library loaded with ctypes, not a Python module


shim = Extension(
    "unionfs._native._shim",
    sources=[f"{NATIVE}/shim.c"],
    include_dirs=_include_dirs(),
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fvisibility=hidden"],
    extra_link_args=[f"-Wl,--version-script={HERE / NATIVE / 'shim.map'}", "-Wl,--no-as-needed", "-lfuse3", "-ldl"],
    depends=[f"{NATIVE}/shim.map"],
)

setup(ext_modules=[shim], cmdclass={"build_ext": OptionalBuildExt})
