"""The passes ``compress()`` runs, in order, over one :class:`compress.Context`.

    load → latency → synthetic → opset → prune → fold → quantize → activation floor → write → measure
    load → latency → synthetic → opset → prune → fold → dynamic → measure          (recipe.dynamic)

Each pass reads what the ones before it left in the context and adds its own; the
runner (``compress.compress``) times each under its name.  What a pass leaves alone
and why goes into the summary: its headline for what matters first (input assumed,
image route, activations kept float), its notes for the rest.
"""

from __future__ import annotations

from .dynamic import dynamic
from .latency import choose_prune
from .load import load
from .measure import measure_speed
from .prune import fold_bn, prune, upgrade_opset
from .quantize import activation_floor, quantize, write
from .synthetic import synthesise

__all__ = ["DYNAMIC", "STATIC", "load"]

_COMMON = [("latency", choose_prune), ("synthetic", synthesise), ("opset", upgrade_opset), ("prune", prune),
           ("fold", fold_bn)]
STATIC = [*_COMMON, ("quantize", quantize), ("activation floor", activation_floor), ("write", write),
          ("measure", measure_speed)]
DYNAMIC = [*_COMMON, ("dynamic", dynamic), ("measure", measure_speed)]
