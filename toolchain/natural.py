"""Procedural images with the statistics of photographs, made without any data or model.

The route for models that carry nothing to invert: no BatchNormalization statistics
(BN folded into the convolutions, as ``torch.onnx.export``, paddle2onnx, ultralytics
and tf2onnx write them) and outputs that are not one score per class (boxes, maps,
sequences).  Each image is a *dead-leaves* picture, the standard model of natural
image statistics (Lee, Mumford & Huang 2001): opaque shapes occluding each other, with
sizes drawn from a power law ``p(r) ∝ r⁻³`` so that the image is scale-invariant and
its power spectrum falls as ``1/f²``.  Each shape is filled with a colour (channels
correlated as in photographs: a luminance plus a smaller chroma) shaded by a smooth
gradient and a ``1/f`` texture, so regions are not flat.  A share of the images carry
rows of dark or light glyphs (random characters drawn with a font), the strokes text
detectors and recognisers react to.  Finally a blur: slight (a lens) for half the images,
for the other half (``soft_share``) as wide as 1-4 pixels, as thumbnails, digital zoom and
low-resolution cameras shown at the model's size give.  Soft ones are where what 8-bit
activations cost shows (the activation floor measures on the mix); fitting uses sharp
ones (ranges set on the mix were not better on real photos).

Values are in [0, 1] (RGB order, H x W); :mod:`.inputs` maps them to the model's own
input convention.  Everything is seeded: the same ``(n, shape, seed)`` gives the same
images.
"""

from __future__ import annotations

import numpy as np

TEXT_SHARE = 0.25            # of the images carry text rows (text-line shaped inputs: all of them)
MIN_RADIUS = 0.015          # of the image's shorter side (at least 1.5 pixels)
TEXTURE_STRENGTH = 0.08
SOFT_SHARE = 0.5             # of the images are soft (by default), as photos shown larger than they were taken


def images(n: int, shape: tuple[int, ...], seed: int = 0, *, text_share: float | None = None,
           soft_share: float = SOFT_SHARE) -> np.ndarray:
    """``n`` images, float32 N x C x H x W in [0, 1]; ``shape`` is (C, H, W); ``soft_share``
    of them soft (0: all sharp, what the input-range inference scores conventions on)."""
    c, h, w = shape
    share = text_share if text_share is not None else (1.0 if w >= 3 * h else TEXT_SHARE)
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img = _dead_leaves(h, w, rng)
        if rng.random() < share:
            img = _text_rows(img, rng)
        soft = soft_share > 0 and rng.random() < soft_share
        img = _blur(img, 0.5 * np.exp(rng.uniform(np.log(2), np.log(8))) if soft else rng.uniform(0.3, 0.9))
        out[i] = _channels(img, c)
    return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour: a luminance (Beta, mid-heavy) plus a smaller chroma, as in photos."""
    lum = rng.beta(2.0, 2.0)
    chroma = rng.normal(0.0, 0.12, 3)
    chroma -= chroma.mean()
    return np.clip(lum + chroma, 0.0, 1.0)


def _radii(count: int, r_min: float, r_max: float, rng: np.random.Generator) -> np.ndarray:
    """Radii with density ∝ r⁻³ on [r_min, r_max] (inverse CDF)."""
    u = rng.random(count)
    a, b = r_min ** -2, r_max ** -2
    return (a - u * (a - b)) ** -0.5


def _dead_leaves(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """3 x H x W dead-leaves image: shapes drawn front to back until the canvas is covered."""
    img = np.empty((3, h, w), np.float32)
    img[:] = _colour(rng)[:, None, None]
    covered = np.zeros((h, w), bool)
    r_min, r_max = max(1.5, MIN_RADIUS * min(h, w)), 0.6 * max(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(4000):
        if covered.mean() > 0.995:
            break
        r = float(_radii(1, r_min, r_max, rng)[0])
        cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
        y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        kind = rng.integers(3)
        if kind == 0:                                   # disk
            mask = dy * dy + dx * dx <= r * r
        elif kind == 1:                                 # rotated rectangle
            t = rng.uniform(0, np.pi)
            u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
            mask = (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.2, 1.0))
        else:                                           # ellipse
            t = rng.uniform(0, np.pi)
            u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
            mask = (u / r) ** 2 + (v / (r * rng.uniform(0.3, 1.0))) ** 2 <= 1.0
        new = mask & ~covered[y0:y1, x0:x1]             # front to back: only where nothing lies yet
        if not new.any():
            continue
        colour = _colour(rng)
        gy, gx = rng.normal(0, 0.15 / max(r, 1.0), 2)   # a soft shading gradient across the shape
        shade = 1.0 + gy * dy[new] + gx * dx[new]
        img[:, y0:y1, x0:x1][:, new] = np.clip(colour[:, None] * shade[None], 0, 1)
        covered[y0:y1, x0:x1] |= mask
    return np.clip(img + _texture(h, w, rng)[None], 0.0, 1.0)


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A 1/f (pink) noise field of standard deviation ``TEXTURE_STRENGTH``."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
    spec[0, 0] = 0.0
    field = np.fft.irfft2(spec, s=(h, w))
    return (TEXTURE_STRENGTH * field / max(float(field.std()), 1e-8)).astype(np.float32)


def _text_rows(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of random characters in a contrasting colour over part of the image."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape[1:]
    pil = Image.fromarray((np.transpose(img, (1, 2, 0)) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    line = max(6, int(min(h, w / 3) * rng.uniform(0.35, 0.8)) if w >= 3 * h else int(h * rng.uniform(0.04, 0.12)))
    rows = 1 if w >= 3 * h else int(rng.integers(1, 5))
    font = ImageFont.load_default(size=line)
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    for _ in range(rows):
        n = int(rng.integers(3, 24))
        text = "".join(rng.choice(list(chars), n)) if rng.random() < 0.8 else " ".join(
            "".join(rng.choice(list(chars), int(rng.integers(2, 8)))) for _ in range(max(1, n // 5)))
        x = int(rng.uniform(0, 0.5) * w)
        y = int(rng.uniform(0, 1) * max(1, h - line)) if w < 3 * h else int((h - line) / 2 + rng.normal(0, 0.1) * h)
        region = img[:, max(0, y):y + line, max(0, x):].mean() if y < h and x < w else 0.5
        ink = 0.05 if region > 0.45 else 0.95
        fill = tuple(int(255 * np.clip(ink + rng.normal(0, 0.08), 0, 1)) for _ in range(3))
        draw.text((x, y), text, fill=fill, font=font)
    return np.transpose(np.asarray(pil, np.float32) / 255.0, (2, 0, 1))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of each channel (reflected edges)."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    rows = sum(k[i] * pad[:, i:i + img.shape[1], :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, :, i:i + img.shape[2]] for i in range(2 * r + 1)).astype(np.float32)


def _channels(img: np.ndarray, c: int) -> np.ndarray:
    """RGB to the model's channel count: grey for one channel, repeated colours beyond three."""
    if c == 3:
        return img
    if c == 1:
        return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    return np.concatenate([img] * (c // 3 + 1))[:c]
