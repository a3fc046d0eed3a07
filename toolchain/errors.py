"""The compressor's errors: ``UserError`` (defined in :mod:`datafree.ops.errors`, which
the runtime shares) and the two ways a model can be beyond compression.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2; the
library lets it propagate so pipelines can catch it.  Anything else escaping is a bug.
"""

from datafree.ops.errors import UserError, format_dims

__all__ = ["CannotSynthesise", "NotCompressible", "UserError", "format_dims"]


class NotCompressible(UserError):
    """The model has nothing this tool can compress."""


class CannotSynthesise(UserError):
    """Synthetic inputs cannot be made for this model (compression falls back to the closed form)."""
