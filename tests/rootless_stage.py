"""Lay out what the rootless test pass (tests/run-rootless.sh) runs from: ``python tests/rootless_stage.py DEST``.

The repository and the interpreter's packages may sit where other users cannot read them (a clone in a private
home, a venv whose ``python`` is a link into /root/.pyenv). So this copies, into ``DEST``:

* ``src/``: ``pyproject.toml``, ``unionfs/``, ``tests/`` and ``examples/`` (what pytest runs, with the
  project's configuration);
* ``site/``: every package from outside the standard library that unionfs and the test suite import (found by
  importing them here, pytest's plugins included), each with its ``*.dist-info`` so that pytest still finds its
  plugins through their entry points;
* ``bin/unionfs``: the command, run by ``PYTHON`` (an interpreter the unprivileged user can execute, of the same
  minor version as this one, e.g. Debian's ``/usr/bin/python3``), with ``src/`` and ``site/`` first on its
  ``sys.path`` (it needs no ``PYTHONPATH``: the podman tests give it to containers/storage as its mount program).

Run it with the interpreter that has the test dependencies installed (the venv's); ``PYTHON`` is the second
argument.  Everything under ``DEST`` is made readable by all; ``DEST`` itself must not exist yet.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What the server and the mount and kernel test suites import; everything they load is copied.
ENTRY_MODULES = (
    "unionfs.cli", "unionfs.fuse.server", "pyfuse3", "trio", "xattr", "pytest", "hypothesis",
    "hypothesis.strategies",
    "rich.progress",  # loaded only when progress is shown on a terminal
    "setproctitle",  # loaded only by spare servers
    "unionfs.image.cli", "unionfs.image._images", "zstandard",  # the image commands (zstd layers)
    "xdist.dsession", "xdist.remote", "execnet",  # tests/run.sh's workers (pytest-xdist)
)
PROJECT = ("pyproject.toml", "unionfs", "tests", "examples")
#: Loaded by the interpreter's own start-up hooks (a ``.pth`` file), not by unionfs or the tests.
SKIP_MODULES = frozenset({"_distutils_hack"})
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


def _load_everything() -> None:
    for name in ENTRY_MODULES:
        importlib.import_module(name)
    import pluggy

    # pytest's plugins registered by other distributions (hypothesis's, for one): pytest loads them at startup.
    pluggy.PluginManager("pytest").load_setuptools_entrypoints("pytest11")


def import_roots() -> dict[str, str]:
    """Top-level module name -> the file or package directory to copy, for every module loaded from a
    ``site-packages`` directory on ``sys.path`` (not the standard library, not the repository, not the hooks of
    an editable install)."""
    _load_everything()
    sites = {os.path.realpath(p) for p in sys.path if p and os.path.basename(p) == "site-packages"}
    roots: dict[str, str] = {}
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if "." in name or not file or name in SKIP_MODULES or name.startswith("__editable__"):
            continue
        real = os.path.realpath(file)
        root = os.path.dirname(real) if os.path.basename(real).startswith("__init__.") else real
        if os.path.dirname(root) in sites:
            roots[name] = root
    return roots


def dist_infos(names: set[str]) -> list[Path]:
    """The ``*.dist-info`` directories of the distributions that provide ``names``."""
    wanted = {d for n in names for d in importlib.metadata.packages_distributions().get(n, [])}
    out = []
    for dist in importlib.metadata.distributions():
        path = getattr(dist, "_path", None)
        if path is None or dist.metadata["Name"] not in wanted or Path(path).suffix != ".dist-info":
            continue
        out.append(Path(path))
    return sorted(set(out))


def _copy(src: str | Path, dst: Path) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, ignore=SKIP, symlinks=False, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _open_to_all(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            os.chmod(p, mode | 0o444 | (0o111 if mode & 0o111 else 0))


def stage(dest: Path, python: str) -> None:
    dest.mkdir(parents=True)
    src, site, bindir = dest / "src", dest / "site", dest / "bin"
    for d in (src, site, bindir):
        d.mkdir()
    for name in PROJECT:
        _copy(REPO / name, src / name)
    roots = import_roots()
    for path in sorted(roots.values()):
        _copy(path, site / os.path.basename(path))
    for info in dist_infos(set(roots)):
        _copy(info, site / info.name)
    exe = bindir / "unionfs"
    # The copy's own directories come first on sys.path, so that the command also runs without PYTHONPATH (as
    # containers/storage's mount program, say).
    exe.write_text(f"#!{python}\nimport sys\n\nsys.path[:0] = [{str(src)!r}, {str(site)!r}]\n\n"
                   "from unionfs.cli import run\n\nrun()\n")
    exe.chmod(0o755)
    _open_to_all(dest)
    print(f"staged {len(roots)} top-level modules for {python}: {' '.join(sorted(roots))}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: rootless_stage.py DEST PYTHON", file=sys.stderr)
        return 2
    stage(Path(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
