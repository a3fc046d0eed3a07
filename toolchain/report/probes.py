"""Probe inputs and running models on them with intermediate outputs exposed.

Probes come from a user's ``.npz`` (``images`` uint8 NHWC with ``mean``/``std``,
or float NCHW ``x``), else from the model's own synthetic images
(``datafree.toolchain.synth``), else seeded standard-normal noise.  The source is
always named, because output SQNR on noise says less than on images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx_ir as ir

from datafree.toolchain.errors import UserError


@dataclass
class Probes:
    x: np.ndarray          # float32, the model's input layout (NCHW for images)
    source: str            # "images: file.npz" | "synthetic (steps=…)" | "gaussian noise (…)"


def input_signature(model: ir.Model) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape with symbolic dims as None) of each graph input."""
    out = []
    for v in model.graph.inputs:
        shape = tuple(d if isinstance(d, int) else None for d in (v.shape or ()))
        out.append((v.name, str(v.dtype), shape))
    return out


def probe_shape(model: ir.Model, n: int) -> tuple[int, ...]:
    if len(model.graph.inputs) != 1:
        raise UserError(f"probes need a model with one input, this one has {len(model.graph.inputs)}")
    _, _, shape = input_signature(model)[0]
    if not shape or any(d is None for d in shape[1:]):
        raise UserError(f"input {model.graph.inputs[0].name!r} has no static shape {shape}: cannot make probes")
    return (n,) + tuple(shape[1:])


def load_images(path: str | Path, model: ir.Model, n: int) -> Probes:
    """Probes from ``path``: ``images`` uint8 NHWC normalised by ``mean``/``std``, or float ``x``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        data = np.load(path)
        keys = set(data.files)
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if "x" in keys:
        x = np.asarray(data["x"], dtype=np.float32)
    elif "images" in keys:
        if not {"mean", "std"} <= keys:
            raise UserError(f"{path}: 'images' needs 'mean' and 'std' beside it")
        img = np.asarray(data["images"])
        if img.ndim != 4:
            raise UserError(f"{path}: 'images' must be NHWC, got shape {img.shape}")
        x = (img.astype(np.float32) / 255.0 - data["mean"].astype(np.float32)) / data["std"].astype(np.float32)
        x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path}: expected key 'images' (uint8 NHWC + mean/std) or 'x' (float NCHW)")
    want = probe_shape(model, len(x))
    if x.shape[1:] != want[1:]:
        raise UserError(f"{path}: images have shape {x.shape[1:]}, the model wants {want[1:]}")
    return Probes(np.ascontiguousarray(x[:n]), f"images: {path.name} ({min(n, len(x))})")


def synthetic(model: ir.Model, n: int, *, steps: int, seed: int, progress=None) -> Probes:
    """The model's own synthetic images; seeded noise when they cannot be made (and why)."""
    try:
        from datafree.toolchain import synth
    except ModuleNotFoundError:
        why = "no synthetic-image generator"
    else:
        kwargs = {} if progress is None else {"progress": progress}
        try:
            from datafree.toolchain import inputs

            try:   # the size and value range compression assumes (symbolic sizes get one)
                spec = inputs.resolve(model, seed=seed)
                kwargs.update(input_shape=spec.shape, convention=spec.convention)
            except UserError:
                pass
            s = synth.generate(model, n, steps=steps, seed=seed, **kwargs)
            return Probes(np.ascontiguousarray(s.images, dtype=np.float32),
                          f"synthetic images ({n}, {steps} steps, {getattr(s, 'source', 'generated')})")
        except UserError as exc:
            why = f"synthetic images unavailable: {exc}"
    x = np.random.default_rng(seed).standard_normal(probe_shape(model, n)).astype(np.float32)
    return Probes(x, f"gaussian noise ({n}, seed {seed}; {why})")


def make_probes(model: ir.Model, n: int, *, images: str | Path | None = None, steps: int = 50,
                seed: int = 0, progress=None) -> Probes:
    if images is not None:
        return load_images(images, model, n)
    return synthetic(model, n, steps=steps, seed=seed, progress=progress)


# ------------------------------------------------------------------- running
def session(model: ir.Model):
    """An onnxruntime CPU session of ``model`` (``ai.datafree`` ops through ``datafree.runtime``)."""
    if any(n.domain not in ("", "ai.onnx") for n in model.graph):
        try:
            from datafree.runtime import InferenceSession
        except ImportError:
            pass
        else:
            return InferenceSession(model)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run this model: {str(exc).splitlines()[0]}") from None


def with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs the values named ``names``."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    values = {v.name: v for n in copy.graph for v in n.outputs}
    have = {v.name for v in copy.graph.outputs}
    for name in names:
        v = values.get(name)
        if v is None or name in have:
            continue
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
        copy.graph.outputs.append(v)
        have.add(name)
    return copy


def run_model(model: ir.Model, x: np.ndarray, names: Iterable[str] = (), batch: int = 32) -> dict[str, np.ndarray]:
    """Run on ``x`` in batches; returns the graph outputs and the extra values ``names``."""
    names = list(names)
    sess = session(with_outputs(model, names) if names else model)
    inp = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    if isinstance(fixed, int) and fixed > 0:   # a static batch: run in chunks of exactly that size
        batch = fixed
        x = x[:max(len(x) // fixed, 1) * fixed]
    outs = [o.name for o in sess.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {o: [] for o in outs}
    for i in range(0, len(x), batch):
        for o, r in zip(outs, sess.run(outs, {inp: x[i:i + batch]})):
            chunks[o].append(np.asarray(r))
    return {o: np.concatenate(v) if v[0].ndim else np.stack(v) for o, v in chunks.items()}
