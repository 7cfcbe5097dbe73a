#!/usr/bin/env bash
# Installs what unionfs needs on a Debian machine: system packages (as root, or through sudo) and a Python
# virtual environment in .venv with the project and its test tools. Safe to run again: it only installs
# what is missing. UNIONFS_SETUP_SYSTEM_ONLY=1 stops after the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's own Python 3 (3.11 on bookworm) is the default: every user of the machine can run it, which the
# tests that run as an unprivileged user need. PYTHON=... picks another interpreter.
# uidmap (newuidmap) lets the rootless pass (tests/run-rootless.sh) map a range of ids into its user namespace.
# The podman tests (tests/podman) run podman and buildah (with runc, as root and rootless) on a busybox image
# made from busybox-static, with fuse-overlayfs as the reference mount program; they need no network.
# skopeo and umoci are the references of the image tests (tests/image, tests/mount/test_image_*.py): what they
# write must import, what unionfs exports they must read, and umoci's unpack must show what unionfs mounts.
# strace kills the snapshot store at each of its writing system calls (tests/snapshots/test_snapshot_killpoints.py).
packages=(fuse3 libfuse3-dev pkg-config gcc attr util-linux uidmap kmod python3 python3-venv python3-dev
          podman buildah runc busybox-static fuse-overlayfs skopeo umoci strace "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ "${UNIONFS_SETUP_SYSTEM_ONLY:-0}" = 1 ] && exit 0

PY=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version)" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.unionfs-installed
# the native part (unionfs/_native) is compiled by the install: again whenever its source changes
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
        || [ unionfs/_native/shim.c -nt "$stamp" ] || [ unionfs/_native/shim.map -nt "$stamp" ]; then
    echo "setup: installing Python dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # compat: a plain path in a .pth file, no import hook: the interpreter starts ~8 ms sooner (the mount
    # program of podman starts with every container)
    .venv/bin/python -m pip install -q -e ".[test]" --config-settings editable_mode=compat
    touch "$stamp"
fi
