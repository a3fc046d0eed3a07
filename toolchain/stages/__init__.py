"""The passes ``compress()`` runs, in order, over one :class:`compress.Context`.

    load → latency → synthetic → opset → prune → fold → quantize → activation floor → write → measure
    load → latency → synthetic → opset → prune → fold → dynamic → measure          (recipe.dynamic)

Each pass reads what the ones before it left in the context and adds its own; the
runner (``compress.compress``) times each under its name.  What a pass leaves alone
and why goes into the summary: its headline for what matters first (input assumed,
image route, activations kept float), its notes for the rest.
"""

from __future__ import annotations

from . import dynamic, latency, load, measure, prune, quantize, synthetic

__all__ = ["DYNAMIC", "STATIC", "dynamic", "latency", "load", "measure", "prune", "quantize", "synthetic"]

_COMMON = [("latency", latency.choose_prune), ("synthetic", synthetic.synthesise), ("opset", prune.upgrade_opset),
           ("prune", prune.prune), ("fold", prune.fold_bn)]
STATIC = [*_COMMON, ("quantize", quantize.quantize), ("activation floor", quantize.activation_floor),
          ("write", quantize.write), ("measure", measure.measure_speed)]
DYNAMIC = [*_COMMON, ("dynamic", dynamic.dynamic), ("measure", measure.measure_speed)]
