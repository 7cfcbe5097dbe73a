"""unionfs: a userspace overlay filesystem with the semantics of Linux overlayfs."""

from .layers import Entry, Stack
from .options import MountSpec, OptionError, parse
from .union import Union
from .whiteout import XattrFormat

__version__ = "0.1.0"

__all__ = ["Entry", "MountSpec", "OptionError", "Stack", "Union", "XattrFormat", "parse", "__version__"]
