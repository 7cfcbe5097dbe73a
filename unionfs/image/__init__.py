"""OCI/Docker image layers: applying a layer tar into a directory in the overlay on-disk format."""

from ._apply import ApplyResult, Progress, apply_into_new, apply_layer
from ._stream import LayerError

__all__ = ["ApplyResult", "LayerError", "Progress", "apply_into_new", "apply_layer"]
