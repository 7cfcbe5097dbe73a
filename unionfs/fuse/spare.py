"""Spare servers (``-o spare``): a server that has loaded pyfuse3 and trio waits for the next mount.

A server's start is bounded by Python's start and the import of pyfuse3 and trio (~85 ms here), which every
container podman starts with unionfs as its mount program waits for. With ``-o spare[=SECONDS]`` the first
server forks, once it has loaded them, a *spare*: a process that holds no mount and no file of any layer, and
waits on a socket for the next ``unionfs`` command of the same user in the same namespaces. That command makes
its mount as always (checks, workdir lock, FUSE mount), then hands the mounted device and the lock to the
spare, which forks the mount's server at once. The spare exits after SECONDS (60) without a mount to start,
and whenever anything fails the command starts its own server as it would without the option.

What a spare's server differs in from one the command forks: it is a child of the spare (reparented once the
spare exits), in the session, cgroup and resource limits of the spare, that is of the first server.

The socket lies in the first runtime directory of :func:`unionfs.fuse.server.runtime_dirs` (mode 0700, owned by
the user), named by the user, its user, mount and pid namespaces, and the unionfs installation, so that a
command only ever reaches a spare of its own kind; a spare serves only connections of its own user.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable

from .. import _sys

log = logging.getLogger("unionfs")

#: how long a spare waits for a mount to start, by default
DEFAULT_IDLE = 60.0
#: how long a command waits for a spare's first answer before starting its own server
ANSWER_TIMEOUT = 2.0
#: how long a command waits, once a spare's server has taken the mount, for it to start
START_TIMEOUT = 60.0
_MAX_REQUEST = 1 << 20


def _cgroup() -> str:
    """This process's cgroups: a spare serves only commands of its own cgroup, so that no server outlives, or
    dies with, the cgroup of another (a systemd unit's, say)."""
    try:
        with open("/proc/self/cgroup") as f:
            return f.read()
    except OSError:
        return "-"


def _identity() -> list[str]:
    """What a server inherits from the process it is forked from and a spare's server must share with the
    command it serves: ids and groups, capabilities, no_new_privs, seccomp, the security label, resource
    limits."""
    keep = ("Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:",
            "Seccomp:")
    parts: list[str] = []
    for name, want in (("/proc/self/status", keep), ("/proc/self/attr/current", None)):
        try:
            with open(name) as f:
                text = f.read()
        except OSError:
            parts.append("-")
            continue
        parts += [line for line in text.splitlines() if want is None or line.startswith(want)]
    import resource

    parts += [repr(resource.getrlimit(getattr(resource, limit))) for limit in sorted(
        n for n in dir(resource) if n.startswith("RLIMIT_"))]
    return parts


def _key(kind: str) -> str:
    from .. import __file__ as package
    from .. import __version__

    parts = [str(os.geteuid()), sys.executable, os.path.dirname(package), __version__, kind, _cgroup(),
             *_identity()]
    for ns in ("user", "mnt", "pid"):
        try:
            parts.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            parts.append("-")
    return _sys.short_digest("\0".join(parts).encode())


def socket_path(dirs: list[str], kind: str | None = None) -> str | None:
    """Where this user's spare for this kind of command listens: in the first of ``dirs`` that is (or can be
    made) a private directory of the user; None when there is none. ``kind`` (unionfs.fuse.native.spare_kind)
    keeps apart the spares that have the native part loaded and those that have not: a spare cannot load it
    once pyfuse3 is imported; by default, the kind a mount without ``-o nonative`` asks for."""
    if kind is None:
        from .native import default_kind

        kind = default_kind()
    for d in dirs:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            return os.path.join(d, f"spare-{_key(kind)}.sock")
    return None


# -- the command's side ----------------------------------------------------------------------------------------


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class HandOverFailed(Exception):
    """A spare's server took the mount and could not start; the message says why."""


def hand_over(path: str | None, request: dict[str, object], fds: list[int]) -> bool:
    """Give the mount to the spare listening at ``path``: ``request`` (what the spare's server needs) and ``fds``
    (the mounted device, and the workdir lock when there is one). True once the spare's server has its pid file
    (it serves the mount); False when no spare took the mount (none listens, or none answered in time): the
    caller then serves it itself. Once a spare's server has said it takes the mount (and been told to go on),
    there is no way back: HandOverFailed when it fails then.

    The exchange: request and descriptors; the server forked for it answers "taken" at once; this side answers
    "go" (a server that sees no "go" exits without touching the mount, so that a command that gave up waiting
    and serves the mount itself is never joined by a second server); the server answers "ok" or "error: WHY"."""
    if path is None:
        return False
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(ANSWER_TIMEOUT)
        try:
            conn.connect(path)
            if _peer_uid(conn) != os.geteuid():
                return False
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
            if conn.recv(64) != b"taken":
                return False
            conn.send(b"go")
        except OSError:
            return False
        conn.settimeout(START_TIMEOUT)
        try:
            answer = conn.recv(4096).decode(errors="replace")
        except OSError as exc:
            raise HandOverFailed(f"the server a spare started for the mount did not answer: {exc}") from None
        if answer == "ok":
            return True
        raise HandOverFailed(answer.removeprefix("error: ") or "the server a spare started for the mount exited")
    finally:
        conn.close()


# -- the spare -------------------------------------------------------------------------------------------------


def start(path: str | None, idle: float, close: Callable[[], None],
          serve_request: Callable[[dict[str, object], list[int], socket.socket], None]) -> None:
    """Fork a spare listening at ``path`` (nothing when ``path`` is None or a live spare listens there). In the
    spare, ``close`` first closes what the forking server holds of its own mount; then each request is served
    in a forked child by ``serve_request(request, fds, connection)``, which must not return. The spare is
    forked twice, so that it is nobody's child (no zombie stays of it)."""
    if path is None:
        return
    pid = os.fork()
    if pid != 0:
        os.waitpid(pid, 0)  # (the spare is its child: this process keeps no zombie of it)
        return
    code = 0
    try:
        close()
        os.setsid()
        if os.fork() == 0:
            _spare(path, idle, serve_request)
    except BaseException:
        code = 1
        log.exception("spare server failed")
    finally:
        os._exit(code)


def _listen(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            sock.close()
            raise
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
            sock.close()
            return None  # a live spare listens there (this one, connected, takes the connection for a request
            # and finds none: it goes on waiting)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # (stale: its spare is gone)
            sock.bind(path)
        finally:
            probe.close()
    sock.listen(8)
    return sock


def _spare(path: str, idle: float, serve_request: Callable[[dict[str, object], list[int], socket.socket],
                                                              None]) -> None:
    import setproctitle  # (here, before any request: the servers forked for requests set their titles at once)

    # (named before it listens: whoever finds the socket finds the spare under its name)
    setproctitle.setproctitle(f"unionfs-spare: waiting {idle:g} s for the next mount ({path})")
    _sys.set_process_name(b"unionfs-spare")
    sock = _listen(path)
    if sock is None:
        return
    ours = os.stat(path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # (the servers it forks are reaped by the kernel)
    from .prepare import LOG_TABLE_SIGNAL

    signal.signal(LOG_TABLE_SIGNAL, signal.SIG_IGN)  # (a spare has no table; the servers it forks install theirs)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    log.info("spare server waiting at %s", path)
    sock.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                return
            with conn:
                try:
                    _take(conn, sock, serve_request)
                except (OSError, ValueError, TypeError) as exc:  # (one bad request ends no spare)
                    log.warning("spare server: a request failed: %s", exc)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ours:
                os.unlink(path)
        sock.close()


def _take(conn: socket.socket, listening: socket.socket,
          serve_request: Callable[[dict[str, object], list[int], socket.socket], None]) -> None:
    """One request: the peer must be this user; the mount's server is forked for it, which answers."""
    conn.settimeout(ANSWER_TIMEOUT)
    msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_REQUEST, 4)
    try:
        for fd in fds:
            os.set_inheritable(fd, False)  # (never to the fusermount3 a server may run)
        if _peer_uid(conn) != os.geteuid() or not msg or not fds:
            return
        request = json.loads(msg)
        if not isinstance(request, dict):
            raise ValueError("a request must be a JSON object")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                listening.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (the server waits for what it runs)
                os.setsid()
                conn.send(b"taken")
                if conn.recv(64) != b"go":
                    os._exit(0)  # the command gave up waiting: it serves the mount itself
                serve_request(request, fds, conn)
            except BaseException:
                code = 1
                log.exception("server started by a spare failed")
            finally:
                os._exit(code)
    finally:
        for fd in fds:
            os.close(fd)
