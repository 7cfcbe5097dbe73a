"""unionfs: a userspace overlay filesystem with the semantics of Linux overlayfs.

The names below are loaded when first used (module ``__getattr__``): ``unionfs umount`` and ``unionfs --version``
need none of the core, and ``unionfs mount`` loads only what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layers import Entry, Stack
    from .options import MountSpec, OptionError, parse
    from .union import Union
    from .whiteout import XattrFormat

__version__ = "0.1.0"

__all__ = ["Entry", "MountSpec", "OptionError", "Stack", "Union", "XattrFormat", "parse", "__version__"]

#: name -> the module that defines it
_LAZY = {"Entry": "layers", "Stack": "layers", "MountSpec": "options", "OptionError": "options", "parse": "options",
         "Union": "union", "XattrFormat": "whiteout"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
