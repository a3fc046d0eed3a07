"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; the library lets it
propagate so pipelines can catch it.  Anything else escaping is a bug.
"""


class UserError(Exception):
    """Bad input: the message names the problem in one line."""


class NotCompressible(UserError):
    """The model has nothing this tool can compress."""


class CannotSynthesise(UserError):
    """Synthetic inputs cannot be made for this model (compression falls back to the closed form)."""
