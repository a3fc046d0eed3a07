"""Fold each layer's BatchNormalization into its weights and bias.

    W' = W · γ/σ     b' = (b − μ) · γ/σ + β        σ = sqrt(var + ε)

Quantized weights must be the folded ones (that is what a device runs), and
onnxruntime fuses QDQ Conv only when no BN sits between the conv and its Q.  Node
names of the layers are kept, so per-layer recipes and reports still match.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph import Layer


def fold_batchnorm(layer: Layer) -> bool:
    """Fold ``layer.bn`` into ``layer`` in place; False when there is none."""
    p = layer.bn_params()
    if p is None:
        return False
    scale = p["gamma"] / np.sqrt(p["var"] + p["eps"])
    w = layer.w_oc()
    layer.set_w_oc(w * scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    bias = (layer.bias_array() - p["mean"]) * scale + p["beta"]
    bn = layer.bn
    layer.set_bias(bias.astype(np.float32))
    out = bn.outputs[0]
    conv_out = layer.node.outputs[0]
    if out.is_graph_output():
        # keep the graph output's name: let the conv write it directly
        graph = bn.graph
        name = out.name
        ir.convenience.replace_all_uses_with(out, conv_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        out.name = None
        conv_out.name = name
    else:
        ir.convenience.replace_all_uses_with(out, conv_out)
        bn.graph.remove(bn, safe=True)
    layer.bn = None
    return True
