"""The one error boundary: OSError becomes FUSEError(errno); anything unexpected is logged and becomes EIO.

With ``-d`` / ``-o debug`` (:func:`set_debug`, called at mount) the boundary also logs every request and its
result at DEBUG, one line each: ``lookup(1, b'etc') -> inode 12``, ``read(3, 0, 4096) -> 4096 bytes``,
``getxattr(5, b'security.selinux') -> ENODATA``. Without it a request costs one test of a module flag more.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

log = logging.getLogger("unionfs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: whether requests are logged (set once, at mount, by :func:`set_debug`)
debug = False

#: a bytes argument longer than this is shown by its length (data), a shorter one as it is (a name)
_SHOWN_BYTES = 64


def set_debug(on: bool) -> None:
    """Log every request and its result at DEBUG from now on (``on``), or stop."""
    global debug
    debug = on


def _show_value(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return repr(bytes(value)) if len(value) <= _SHOWN_BYTES else f"<{len(value)} bytes>"
    if isinstance(value, pyfuse3.EntryAttributes):
        return f"<attributes of inode {value.st_ino}>"
    if isinstance(value, pyfuse3.SetattrFields):
        return "<" + ",".join(n.removeprefix("update_") for n in dir(value)
                              if n.startswith("update_") and getattr(value, n)) + ">"
    return repr(value)


def _show_result(value: object) -> str:
    if value is None:
        return "ok"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value)} bytes"
    if isinstance(value, pyfuse3.EntryAttributes):
        return f"inode {value.st_ino}" if value.st_ino else "no such name (negative entry)"
    if isinstance(value, pyfuse3.FileInfo):
        return f"fh {value.fh}"
    if isinstance(value, tuple):
        return ", ".join(_show_result(v) for v in value)
    if isinstance(value, list):
        return f"{len(value)} items"
    return repr(value)


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def log_request(name: str, args: tuple[Any, ...], result: str) -> None:
    """One DEBUG line ``NAME(ARGS...) -> RESULT`` (request contexts and readdir tokens are left out)."""
    shown = ", ".join(_show_value(a) for a in args
                      if not isinstance(a, pyfuse3.RequestContext | pyfuse3.ReaddirToken))
    log.debug("%s(%s) -> %s", name, shown, result)


def boundary(fn: F) -> F:
    """Wrap a request handler so that only ``pyfuse3.FUSEError`` ever leaves it (and log it when debugging)."""
    name = fn.__name__.lstrip("_")

    async def logged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        shown = args[1:]  # (not the Operations instance)
        try:
            result = await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            log_request(name, shown, errno_name(exc.errno))
            raise
        except OSError as exc:
            log_request(name, shown, errno_name(exc.errno or errno.EIO))
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            log_request(name, shown, "EIO")
            raise pyfuse3.FUSEError(errno.EIO) from None
        log_request(name, shown, _show_result(result))
        return result

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if debug:
            return await logged(args, kwargs)
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]
