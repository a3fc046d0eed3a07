"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; the library lets it
propagate so pipelines can catch it.  Anything else escaping is a bug.  Defined here,
beside the op domain, so that the runtime raises it without the compressor installed;
``datafree.toolchain.errors`` is the same class.
"""

from numbers import Integral


def format_dims(dims) -> str:
    """Tensor dims for a message, ``[batch, 3, 32, 32]``: a symbolic dim by its name
    where it has one (onnx_ir's SymbolicDim, onnxruntime's str), else ``?``."""
    def one(d) -> str:
        if isinstance(d, Integral):
            return str(int(d))
        name = getattr(d, "value", d)
        return name if isinstance(name, str) and name else "?"

    return "[" + ", ".join(one(d) for d in dims) + "]"


class UserError(Exception):
    """Bad input: the message names the problem in one line."""
