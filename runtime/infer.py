"""Batched inference over an image set: predictions, accuracy, and the bits a
dynamic model chose for each image.

Image sets: an ``.npz`` with ``images`` (uint8 NHWC, normalised ``(x/255 − mean)/std``
with its own ``mean``/``std`` when present, else ``x/255``) or ``x`` (float NCHW,
used as is), and optional ``labels``; or a folder of PNG/JPEG files (resized to the
model's input size, ``x/255``).

Dynamic models (second output ``bits`` [N, G], one bit-width per layer group) run
as :class:`datafree.runtime.InferenceSession` runs them; ``avg_bits`` is what each
image cost (``datafree.ops.domain.image_bits``: in a cascade an image that was run
again counts both passes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datafree.ops import domain
from datafree.ops.errors import UserError, format_dims

from .session import InferenceSession

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class ImageSet:
    x: np.ndarray                      # float32 NCHW
    labels: np.ndarray | None = None
    names: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    predictions: np.ndarray            # [N] int64
    logits: np.ndarray                 # [N, classes]
    labels: np.ndarray | None = None
    bits: np.ndarray | None = None     # [N, G] for dynamic models
    avg_bits: np.ndarray | None = None  # [N], MAC-weighted over the groups, both passes of a cascade
    names: list[str] = field(default_factory=list)
    first: tuple[int, ...] | None = None   # a cascade's first configuration (every image runs it)

    @property
    def accuracy(self) -> float | None:
        if self.labels is None:
            return None
        return float(np.mean(self.predictions == self.labels))

    def bits_histogram(self) -> dict[str, int]:
        """Images per configuration, keyed like ``"4/6/8"`` (a cascade's reruns like
        ``"4/4/4 then 8/6/8"``: they ran both)."""
        if self.bits is None:
            return {}
        keys, counts = np.unique(self.bits.astype(int), axis=0, return_counts=True)
        return {domain.config_label(k, self.first): int(c) for k, c in zip(keys, counts)}

    def to_json(self) -> dict:
        out: dict = {"images": len(self.predictions), "predictions": self.predictions.tolist()}
        if self.names:
            out["names"] = self.names
        if self.labels is not None:
            out["labels"] = self.labels.tolist()
            out["accuracy"] = self.accuracy
        if self.bits is not None:
            out["bits"] = self.bits.tolist()
            out["avg_bits"] = [round(float(b), 4) for b in self.avg_bits]
            out["mean_bits"] = float(np.mean(self.avg_bits))
            out["configurations"] = self.bits_histogram()
        return out


def load_images(path: str | os.PathLike, size: tuple[int, int] | None = None) -> ImageSet:
    """Read an ``.npz`` or a folder of images into float32 NCHW (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, size)
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    labels = np.asarray(data["labels"]).astype(np.int64) if "labels" in keys else None
    if "images" in keys:
        images = np.asarray(data["images"])
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise UserError(f"{path}: 'images' must be NHWC with 1, 3 or 4 channels, got shape {images.shape}")
        x = images.astype(np.float32) / 255.0
        if "mean" in keys and "std" in keys:
            x = (x - np.asarray(data["mean"], np.float32)) / np.asarray(data["std"], np.float32)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif "x" in keys:
        x = np.asarray(data["x"], dtype=np.float32)
        if x.ndim < 2:
            raise UserError(f"{path}: 'x' must be a batch (first axis = images), got shape {x.shape}")
    else:
        raise UserError(f"{path}: the .npz has no 'images' (uint8 NHWC) or 'x' (float NCHW) array "
                        f"(keys: {', '.join(sorted(keys)) or 'none'})")
    if labels is not None and len(labels) != len(x):
        raise UserError(f"{path}: {len(labels)} labels for {len(x)} images")
    return ImageSet(x=x, labels=labels)


def _load_folder(path: Path, size: tuple[int, int] | None) -> ImageSet:
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"{path}: reading a folder of images needs Pillow (pip install pillow); "
                        "an .npz needs nothing more") from None

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no PNG/JPEG images in this folder")
    arrays = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB")
        except Exception as exc:
            raise UserError(f"{f}: not a readable image ({type(exc).__name__})") from None
        if size is not None:
            img = img.resize((size[1], size[0]))
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    if len({a.shape for a in arrays}) > 1:
        raise UserError(f"{path}: images have different sizes and the model input size is not fixed")
    x = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    return ImageSet(x=x, names=[f.name for f in files])


def input_size(session: InferenceSession) -> tuple[int, int] | None:
    shape = session.get_inputs()[0].shape
    if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def _check_fits(want, have) -> None:
    """Images whose shape the model input cannot take: one line, before onnxruntime's own error."""
    if len(want) != len(have) or any(isinstance(w, int) and w != h for w, h in zip(want[1:], have[1:])):
        raise UserError(f"images of shape {format_dims(have[1:])} do not fit the model input "
                        f"{format_dims(want[1:])} (batch axis left out)")


def predict(session: InferenceSession, images: ImageSet, batch: int = 64) -> Predictions:
    """Run ``session`` over ``images`` in batches."""
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if len(session.input_names) != 1:
        raise UserError(f"the model has {len(session.input_names)} inputs ({', '.join(session.input_names)}): "
                        "datafree run feeds images to models with one")
    name = session.input_names[0]
    want = session.get_inputs()[0].shape
    _check_fits(want, images.x.shape)
    fixed = want[0] if want and isinstance(want[0], int) else None
    if fixed:                                  # a fixed batch axis: runs of exactly that many
        batch = fixed
    logits, bits = [], []
    for start in range(0, len(images.x), batch):
        x = images.x[start:start + batch]
        n = len(x)
        if fixed and n < fixed:                # the last run padded with copies, then cut
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        outs = session.run(None, {name: x})
        logits.append(outs[0][:n])
        if session.dynamic and len(outs) > 1:
            bits.append(outs[1][:n])
    logits_arr = np.concatenate(logits).reshape(len(images.x), -1)
    result = Predictions(predictions=np.argmax(logits_arr, axis=1).astype(np.int64), logits=logits_arr,
                         labels=images.labels, names=images.names)
    if bits:
        b = np.concatenate(bits).astype(np.float32).reshape(len(images.x), -1)
        meta = session.dynamic_metadata
        result.bits, result.avg_bits = b, domain.image_bits(meta, b).astype(np.float32)
        if meta.get("mode") == "cascade":
            result.first = tuple(int(v) for v in meta["configs"][0])
    return result


def run_file(model: str | os.PathLike, images: str | os.PathLike, *, batch: int = 64,
             threads: int | None = None, use_kernels: bool = True) -> Predictions:
    """``datafree run`` as a function: load the model and the images, predict."""
    # use_kernels=False asks for the function bodies, as a stock onnxruntime runs the file
    session = InferenceSession(model, threads=threads, use_kernels=use_kernels,
                               grouped=None if use_kernels else False)
    return predict(session, load_images(images, input_size(session)), batch=batch)
