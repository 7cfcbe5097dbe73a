"""Container images over the snapshot store: OCI and Docker image formats read and written, layer tars applied
into (and diffed out of) directories in the overlay on-disk format, and the image operations the ``unionfs
image`` and ``unionfs layer`` commands run (:mod:`._images`). Nothing here imports pyfuse3 or trio."""

from ._apply import ApplyResult, Progress, apply_into_new, apply_layer
from ._diff import DiffError, DiffResult, compression_for, write_diff, write_diff_file
from ._oci import ImageError
from ._stream import LayerError

__all__ = [
    "ApplyResult", "DiffError", "DiffResult", "ImageError", "LayerError", "Progress", "apply_into_new",
    "apply_layer", "compression_for", "write_diff", "write_diff_file",
]
