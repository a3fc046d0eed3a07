"""Move a dynamic model's average bits to a new target, measured on the inputs it will see.

    model, info = retarget("dyn.onnx", images, target_bits=5.0)     # images: unlabeled, float NCHW

The compressor prices the bit selector on synthetic probes (``--target-bits``).  Real
inputs can be less sure than those probes, and a cascade then reruns more of them
than it planned (ResNet-20 at a 4.5-bit target: 5.3 bits on real images).  Given a
batch of the inputs a device really sees (no labels), ``retarget`` sets the selector's
price per bit again, with the same rule as the compressor, so that these inputs cost
at most ``target_bits`` on average (both passes of a cascade's rerun counted).  Only
the selector's last bias changes: weights, configurations and the graph stay as they
are, so the new target may also be any other one in the candidates' range, without
fitting anything again.  What was done is recorded in the model's ``datafree.dynamic``
metadata under ``retarget``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from datafree.ops import domain
from datafree.ops.errors import UserError
from datafree.ops.selector import Selector, calibrate_price

from .infer import _check_fits, load_images
from .session import _load
from .specialise import _prune


def _selector_node(model: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [n for n in model.graph.node if n.domain == domain.DOMAIN and n.op_type == "BitSelect"]
    if len(nodes) != 1:
        raise UserError("not a dynamic-precision model (no bit selector): only models written by "
                        "'datafree compress --dynamic' can be retargeted")
    return nodes[0]


def selector_features(model: onnx.ModelProto, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """What the model's ``BitSelect`` reads for each image, pooled over space as it pools
    it (a cascade: its first pass's margin; upfront: the stem's output), from the nodes
    it needs only."""
    node = _selector_node(model)
    part = _prune(model, [node.input[0]])
    del part.graph.output[:]
    part.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(part.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    _check_fits(inp.shape, images.shape)
    x = np.ascontiguousarray(images, np.float32)
    f = np.concatenate([sess.run(None, {inp.name: x[s:s + batch]})[0] for s in range(0, len(x), batch)])
    return f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2, dtype=np.float32)     # as kernels.bit_select


def retarget(source, images: np.ndarray, target_bits: float) -> tuple[onnx.ModelProto, dict]:
    """A copy of the dynamic model ``source`` whose selector is priced so that ``images``
    cost at most ``target_bits`` on average, and what changed (bits before and after)."""
    model = onnx.ModelProto()
    model.CopyFrom(_load(source))
    node = _selector_node(model)
    meta_props = {p.key: p.value for p in model.metadata_props}
    meta = domain.dynamic_metadata(meta_props)
    if not meta:
        raise UserError(f"the model has no '{domain.METADATA_KEY}' metadata: it was not written by "
                        "'datafree compress --dynamic'")
    images = np.asarray(images, np.float32)
    if len(images) < 1:
        raise UserError("retarget needs at least one image")
    inits = {t.name: t for t in model.graph.initializer}
    try:
        w1, b1, w2, b2, table = (numpy_helper.to_array(inits[name]) for name in node.input[1:6])
    except KeyError as exc:
        raise UserError(f"the bit selector's weights are not constants ({exc.args[0]}): cannot retarget") from None
    cost = domain.image_bits(meta, table)
    if not cost.min() - 1e-9 <= target_bits <= cost.max() + 1e-9:
        raise UserError(f"target_bits {target_bits} is outside what this model's choices cost "
                        f"({cost.min():.2f}..{cost.max():.2f} bits)")
    features = selector_features(model, images)
    selector = Selector(w1=w1, b1=b1, w2=w2, b2=b2.astype(np.float32))
    before = float(cost[selector.choose(features)].mean())
    price = calibrate_price(selector, features, cost, float(target_bits))
    after = float(cost[selector.choose(features)].mean())
    inits[node.input[4]].CopyFrom(numpy_helper.from_array(selector.b2.astype(np.float32), node.input[4]))
    info = {"target_bits": float(target_bits), "images": int(len(images)), "bits_before": round(before, 4),
            "bits_after": round(after, 4), "price_per_bit": float(price)}
    meta["retarget"] = info
    entry = next(p for p in model.metadata_props if p.key == domain.METADATA_KEY)
    entry.value = json.dumps(meta)
    return model, info


def retarget_file(model, images, target_bits: float) -> tuple[onnx.ModelProto, dict]:
    """:func:`retarget` from paths: the model, and an ``.npz`` or a folder of images
    (read as ``datafree run`` reads them, resized to a fixed model input)."""
    proto = _load(model)
    dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else []
    size = tuple(d.dim_value for d in dims[2:4]) if len(dims) == 4 and all(d.dim_value for d in dims[2:4]) else None
    return retarget(proto, load_images(images, size).x, target_bits)
