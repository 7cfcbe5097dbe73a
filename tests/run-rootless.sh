#!/usr/bin/env bash
# The rootless pass: the real-mount suite (tests/mount) and the kernel differential suite (tests/kernel) run a
# second time as an unprivileged user. Run it as root (tests/run.sh does, after the main suite): root only
# prepares and cleans up, nothing under test runs with privileges. Extra arguments go to both pytest runs.
#
#  * the user `unionfs-test` is created when missing, with a range of subordinate ids in /etc/subuid and
#    /etc/subgid (for the user namespace below);
#  * /dev/fuse is made usable by every user for the run (some machines ship it 0600); its mode is put back at
#    the end;
#  * the project and the packages it imports are copied into a fresh directory the user owns
#    (tests/rootless_stage.py), since the repository and the venv may be unreadable to other users; Debian's
#    /usr/bin/python3 runs them (UNIONFS_ROOTLESS_PYTHON picks another, of the same minor version as the venv);
#  * tests/mount runs as the plain user, no namespace: unionfs mounts through fusermount3 and cannot write
#    trusted.* xattrs, so it marks opaque directories with user.overlay.opaque; tests needing real root skip;
#  * tests/kernel runs as the same user inside a user, mount and pid namespace it creates itself (unshare; its
#    own uid is root there, its subordinate ids are 1-65536): there the kernel lets it mount overlayfs with
#    -o userxattr, and unionfs runs beside it with no privilege over the host (no trusted.*, no device nodes, no
#    ids outside the map). The harness builds its layers with user.overlay.* markers and mounts both sides with
#    userxattr (UNIONFS_TEST_XATTR=user). Everything left mounted there goes away with the namespace.
#
# The podman tests (tests/podman) are not run here: the main pass, as root, runs their rootless cases as this same
# user (setpriv, with subordinate ids, XDG_RUNTIME_DIR and storage of their own), next to the root cases.
#
# The interpreter with the test dependencies (which the copy is taken from): UNIONFS_TEST_PYTHON, else
# .venv/bin/python, else the active virtual environment's, else tests/setup.sh makes .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/suite.sh

USER_NAME=unionfs-test
SUBIDS=65536
FUSE_DEV=/dev/fuse

if [ "$(id -u)" -ne 0 ]; then
    echo "run-rootless: run me as root: I create the test user and open up $FUSE_DEV for the run" >&2
    exit 2
fi

for tool in fusermount3 newuidmap newgidmap unshare setpriv useradd usermod; do
    if ! command -v "$tool" >/dev/null; then
        UNIONFS_SETUP_SYSTEM_ONLY=1 bash tests/setup.sh
        break
    fi
done

test_py=${UNIONFS_TEST_PYTHON:-}
if [ -z "$test_py" ]; then
    if [ -x .venv/bin/python ]; then
        test_py=.venv/bin/python
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        test_py=$VIRTUAL_ENV/bin/python
    else
        bash tests/setup.sh
        test_py=.venv/bin/python
    fi
fi
run_py=${UNIONFS_ROOTLESS_PYTHON:-/usr/bin/python3}
version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ "$(version "$test_py")" != "$(version "$run_py")" ]; then
    echo "run-rootless: $run_py is Python $(version "$run_py"), the packages are for $(version "$test_py")" \
         "($test_py); set UNIONFS_ROOTLESS_PYTHON" >&2
    exit 2
fi

# -- the user and its subordinate ids ----------------------------------------------------------------------------

if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
uid=$(id -u "$USER_NAME")
gid=$(id -g "$USER_NAME")

# The first subordinate range of the user in FILE, as "start count", or nothing.
subrange() { awk -F: -v u="$USER_NAME" -v n="$uid" '($1 == u || $1 == n) && $3 >= c { print $2, $3; exit }' \
                 c="$SUBIDS" "$1" 2>/dev/null || true; }
if [ -z "$(subrange /etc/subuid)" ] || [ -z "$(subrange /etc/subgid)" ]; then
    # A free block after every range already handed out (in either file), at 100000 at the lowest.
    start=$(cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: 'BEGIN { m = 100000 }
        NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }')
    usermod --add-subuids "$start-$((start + SUBIDS - 1))" --add-subgids "$start-$((start + SUBIDS - 1))" \
            "$USER_NAME"
fi
read -r subuid _ <<<"$(subrange /etc/subuid)"
read -r subgid _ <<<"$(subrange /etc/subgid)"

# -- /dev/fuse, the work directory, and cleaning up -----------------------------------------------------------

run=$(mktemp -d /tmp/unionfs-rootless.XXXXXX)
chmod 0755 "$run"
fuse_mode=$(stat -c %a "$FUSE_DEV")

cleanup() {
    # Anything the plain-user pass left mounted in the host's namespace (the namespace of the kernel pass took
    # its mounts with it), innermost first; then the directory and /dev/fuse's mode.
    local m
    awk -v r="$run/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
        echo "run-rootless: $m was still mounted; unmounting it" >&2
        umount -l "$m" || true
    done
    rm -rf "$run" || true
    chmod "$fuse_mode" "$FUSE_DEV" || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
chmod 0666 "$FUSE_DEV"

"$test_py" tests/rootless_stage.py "$run/stage" "$run_py"
mkdir "$run/tmp" "$run/home"
chown -R "$uid:$gid" "$run"

# A lower layer owned by an id outside the user namespace of the kernel pass (the host's root), as a system
# directory under a rootless stack is: file, private (0600), dir/inner, empty/, pub/ (0777) holding pub/mine,
# the user's own, tmp/ (1777) holding the host root's tmp/theirs and the user's tmp/own, and the user's mine/
# holding the host root's symlink mine/link and FIFO mine/fifo, and nox/ (0744) holding nox/f.
foreign=$run/foreign
mkdir -m 0755 "$foreign" "$foreign/dir" "$foreign/empty"
mkdir -m 0777 "$foreign/pub" "$foreign/tmp"
chmod 0777 "$foreign/pub"
chmod 1777 "$foreign/tmp"
echo "the host's root owns me" >"$foreign/file"
echo "only the host's root reads me" >"$foreign/private"
echo "in a directory of the host's root" >"$foreign/dir/inner"
echo "the test user's, in a directory of the host's root" >"$foreign/pub/mine"
echo "the host's root's, in a sticky directory" >"$foreign/tmp/theirs"
echo "the test user's, in a sticky directory" >"$foreign/tmp/own"
chmod 0644 "$foreign/file" "$foreign/dir/inner" "$foreign/pub/mine" "$foreign/tmp/theirs" "$foreign/tmp/own"
chmod 0600 "$foreign/private"
# mine/ is the test user's, holding a symlink and a FIFO of the host's root
mkdir -m 0755 "$foreign/mine"
ln -s file "$foreign/mine/link"
mkfifo -m 0644 "$foreign/mine/fifo"
# nox/ may be read but not searched by others
mkdir -m 0744 "$foreign/nox"
echo "behind a directory others may list but not search" >"$foreign/nox/f"
chown "$uid:$gid" "$foreign/pub/mine" "$foreign/tmp/own" "$foreign/mine"

src=$run/stage/src
user_env=(
    env -i
    "PATH=$run/stage/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    "PYTHONPATH=$src:$run/stage/site"
    "PYTHONDONTWRITEBYTECODE=1"
    "HOME=$run/home"
    "TMPDIR=$run/tmp"
    "USER=$USER_NAME"
    "LOGNAME=$USER_NAME"
    "LANG=C.UTF-8"
)
# Test tuning variables pass through.
while IFS= read -r var; do
    user_env+=("$var=${!var}")
done < <(compgen -e | grep -E '^UNIONFS_(TEST|DIFF)_' || true)
as_user=(setpriv "--reuid=$uid" "--regid=$gid" --clear-groups)
pytest=("$run_py" -m pytest -q -p no:cacheprovider)

status=0
echo "== rootless: tests/mount as $USER_NAME (uid $uid), no namespace" >&2
(cd "$src" && run_split "${as_user[@]}" "${user_env[@]}" "${pytest[@]}" tests/mount "$@") || status=1

echo "== rootless: tests/kernel as $USER_NAME (uid $uid) in its own user namespace" \
     "(uid 0 -> $uid, 1-$SUBIDS -> $subuid-$((subuid + SUBIDS - 1))), overlayfs with userxattr" >&2
(cd "$src" && run_split "${as_user[@]}" "${user_env[@]}" UNIONFS_TEST_XATTR=user "UNIONFS_TEST_FOREIGN_LAYER=$foreign" \
    unshare --map-user=0 --map-group=0 \
            "--map-users=$subuid,1,$SUBIDS" "--map-groups=$subgid,1,$SUBIDS" \
            --mount --propagation private --pid --fork --kill-child --mount-proc \
            "${pytest[@]}" tests/kernel "$@") || status=1

echo "== rootless: differential suites of lookup, errno, copy-up and random operations again with -o prescan," \
     "in the same kind of namespace" >&2
(cd "$src" && run_split "${as_user[@]}" "${user_env[@]}" UNIONFS_TEST_XATTR=user UNIONFS_DIFF_OPTIONS=prescan \
    unshare --map-user=0 --map-group=0 \
            "--map-users=$subuid,1,$SUBIDS" "--map-groups=$subgid,1,$SUBIDS" \
            --mount --propagation private --pid --fork --kill-child --mount-proc \
            "${pytest[@]}" tests/kernel/test_kernel_lookup.py tests/kernel/test_kernel_errno.py \
            tests/kernel/test_kernel_random.py tests/kernel/test_kernel_copy_up.py tests/kernel/test_kernel_deep.py \
            "$@") || status=1

exit $status
