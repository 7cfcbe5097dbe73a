"""The one error boundary: OSError becomes FUSEError(errno); anything unexpected is logged and becomes EIO."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

log = logging.getLogger("unionfs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def boundary(fn: F) -> F:
    """Wrap a request handler so that only ``pyfuse3.FUSEError`` ever leaves it."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
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
