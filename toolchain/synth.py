"""The synthetic-data generator: images a model "recognises", made from the model alone.

Compensation fitting, calibration and dynamic-precision training all read their
inputs from here, so there is one way to make them and one cache.

Method (DeepInversion / ZeroQ / Genie, as adapted for DynaDFQ, see methods.md §2).
Images start as seeded, smooth Gaussian noise in the model's (normalised) input
space (drawn at a quarter of the size and upsampled: natural images are mostly low
frequency, and starting there lowers both the BN loss and the total variation
reached in a given number of steps).  Adam with a cosine-decayed learning rate
optimises the pixels to minimise

    L = Σ_BN ( ||μ_batch − μ_run||₂ + ||σ_batch − σ_run||₂ )      on each BN *input*
      + CE(softmax(logits), y)                                       soft target
      + λ_tv · TV(x) + λ_l2 · mean(x²)                               image priors

with ``y = softmax(cos(W_c, W_k) / τ)`` over classes k: ``c`` is the image's target
class (classes balanced over the set), ``W`` the rows of the final classifier, τ
log-uniform in [0.1, 1] per image so targets range from nearly one-hot (easy) to
spread over similar classes (hard).  Between steps the batch is randomly shifted by
a few pixels and flipped horizontally, so the images do not overfit one alignment.

Models without BatchNormalization (BN folded into the convolutions) have no
statistics to match.  Their images are procedural photographs (``source =
"natural"``, :mod:`.natural`) in the input's value range (:mod:`.inputs`): they need
nothing from the model, and classifiers fit on them better than on images optimised
toward their classes.  That optimisation stays available (``route="output-only"``,
and for classifiers of inputs that are not images).  The start is smoother (1/8 size)
and the learning rate five times smaller: with nothing anchoring the internal
statistics, large steps reach the target class through adversarial high-frequency
patterns.  The loss is the soft-target CE with much stronger TV and l2 priors,
plus two scale priors that need no lost statistics: the input's per-channel batch mean and std are pulled to 0 and 1 (what
a normalised input has by definition), and every convolution's pre-activation is
penalised when its RMS exceeds ``ACT_RMS_LIMIT`` (``relu(log(rms / limit))²``), so
activations cannot grow into the adversarial regime.  Pulling each channel's std
towards 1 was tried and rejected: trained networks have many near-dead channels
(std ≈ 0 on real images) that such a prior would force open.  Output-only images
reach the target class about as often, but their internal statistics stay further
from real images' (see benchmarks/synth_quality.py).

Images are generated chunk by chunk (``batch_size`` at a time, each chunk seeded
from ``(seed, chunk index)``), so memory is bounded by one chunk and the first k
chunks do not depend on ``n``.  The cache holds each chunk on its own, so a second
compression of the same model asking for more or fewer images (4-bit weights after
8-bit activations only, a time budget) makes only the chunks it lacks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from . import device as dev
from .errors import CannotSynthesise, UserError, format_dims
from .inputs import Convention
from .progress import ProgressFn, silent
from .synth_cache import GENERATOR_VERSION, ChunkCache, SyntheticSet, cache_key, chunk_cache  # noqa: F401  (synth.*)
from .synth_model import (ROUTES, RouteRefused, _class_similarity, _classifier,  # noqa: F401  (synth.* names)
                          _conv_outputs, _logits_value, _route)
from .torchgraph import TorchGraph

STAGE = "synthetic images"

DEFAULT_STEPS = 80           # 256 CIFAR-size images on ResNet-20: about a minute on 2 cores
LR = 0.25
OUTPUT_ONLY_LR = 0.05        # output-only: small steps keep the smooth start (large ones turn adversarial)
TAU_RANGE = (0.1, 1.0)
BN_PRIORS = {"tv": 1e-2, "l2": 1e-4}
OUTPUT_ONLY_PRIORS = {"tv": 1.0, "l2": 1e-3, "act": 1.0, "input": 1.0}
ACT_RMS_LIMIT = 2.0          # output-only: pre-activations louder than this (RMS) are penalised
CE_WEIGHT = 1.0
INIT_DOWNSCALE = 4           # start from noise this many times smaller than the input, upsampled
OUTPUT_ONLY_INIT_DOWNSCALE = 8
JITTER_FRACTION = 1 / 16     # of the spatial size, at least one pixel


def generate(model: ir.Model, n: int, *, steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = 64,
             input_shape: tuple[int, ...] | None = None, convention: Convention | None = None,
             route: str = "auto", progress: ProgressFn = silent, cache: bool = True,
             cache_dir: str | Path | None = None) -> SyntheticSet:
    """``n`` synthetic inputs for ``model`` (cached on disk by model bytes and arguments).

    ``convention``: the input's value range (:mod:`.inputs`); images are made in it.
    Without BN statistics or class scores it is required: the images are then
    procedural photographs (:mod:`.natural`) in that range.  ``route`` forces one way of
    making them (:data:`ROUTES`; "auto" picks as :func:`_route` says)."""
    if n <= 0:
        raise UserError(f"number of synthetic images must be positive, got {n}")
    if steps < 0 or batch_size <= 0:
        raise UserError("steps must be >= 0 and batch_size > 0")
    _check_image_input(model)
    shape = sample_shape(model, input_shape)
    if convention is None:
        convention = _convention(model, shape, seed)
    chunks = None
    if cache:
        chunks = chunk_cache(model, shape, convention, route, steps=steps, seed=seed, batch_size=batch_size,
                             cache_dir=cache_dir)
        cached = chunks.whole(n, batch_size)
        if cached is not None:
            progress(STAGE, n, n)
            return cached
    try:
        generator = _Generator(model, shape, convention, route)
    except (CannotSynthesise, RouteRefused):
        raise
    except UserError as exc:  # an op the differentiable copy does not know
        raise CannotSynthesise(str(exc)) from None
    return generator.run(n, steps=steps, seed=seed, batch_size=batch_size, progress=progress, chunks=chunks)


def is_cached(model: ir.Model, n: int, *, steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = 64,
              input_shape: tuple[int, ...] | None = None, convention: Convention | None = None,
              route: str = "auto", cache_dir: str | Path | None = None) -> bool:
    """Whether :func:`generate` with these arguments reads all ``n`` images from the cache at
    once, before building its generator (a model too large for ``batch_size`` images per
    chunk is made in smaller chunks, which only the generator finds)."""
    shape = sample_shape(model, input_shape)
    if convention is None:
        convention = _convention(model, shape, seed)
    chunks = chunk_cache(model, shape, convention, route, steps=steps, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir)
    return chunks.on_disk(n, batch_size)


def augmented(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` with their left-right mirrors and a copy of both shifted by a few
    pixels (reflected at the border): four times the data without generating more.
    Image models see such copies as the same kind of input; other inputs (not NCHW)
    come back unchanged.  The shifts are seeded."""
    if images.ndim != 4:
        return images
    both = np.concatenate([images, images[..., ::-1]])
    h, w = both.shape[2:]
    r = max(1, min(h, w) // 10)
    rng = np.random.default_rng(seed)
    padded = np.pad(both, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect" if min(h, w) > r else "edge")
    shifted = np.empty_like(both)
    for i, (dy, dx) in enumerate(rng.integers(-r, r + 1, size=(len(both), 2))):
        shifted[i] = padded[i, :, r + dy:r + dy + h, r + dx:r + dx + w]
    return np.ascontiguousarray(np.concatenate([both, shifted]))


def _check_image_input(model: ir.Model) -> None:
    """Synthetic inputs are made for one floating-point input (images, signals, features)."""
    inputs = list(model.graph.inputs)
    if len(inputs) != 1:
        raise CannotSynthesise(f"the model has {len(inputs)} inputs ({', '.join(repr(v.name) for v in inputs)}): "
                               "synthetic inputs are made for models with one")
    dtype = inputs[0].dtype
    if dtype is not None and dtype != ir.DataType.FLOAT:
        raise CannotSynthesise(f"input {inputs[0].name!r} is {dtype.name.lower()}, not float32: synthetic inputs "
                               "are made by gradient descent on float inputs")


# ------------------------------------------------------------------ shapes and keys
def sample_shape(model: ir.Model, input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The shape of one input sample (no batch axis)."""
    if not model.graph.inputs:
        raise UserError("model has no inputs")
    value = model.graph.inputs[0]
    dims = list(value.shape) if value.shape is not None else None
    if input_shape is not None:
        given = tuple(int(d) for d in input_shape)
        if dims is not None and len(given) == len(dims):
            given = given[1:]
        if dims is not None and len(given) != len(dims) - 1:
            raise UserError(f"input_shape {tuple(input_shape)} does not fit the model input of rank {len(dims)}")
        if dims is not None:
            for want, have in zip(dims[1:], given):
                if isinstance(want, int) and want != have:
                    raise UserError(f"input_shape {tuple(input_shape)} does not match the model input "
                                    f"{format_dims(dims)}")
        return given
    if dims is None or any(not isinstance(d, int) for d in dims[1:]):
        raise CannotSynthesise(f"input size {format_dims(dims) if dims is not None else '?'} is symbolic: "
                               "pass input_shape (--input-shape)")
    return tuple(int(d) for d in dims[1:])


def _convention(model: ir.Model, shape: tuple[int, ...], seed: int) -> Convention | None:
    """The input's value range as :mod:`.inputs` infers it (None for inputs that are not images)."""
    from . import inputs

    return inputs.infer_range(model, shape, seed)[0] if inputs.is_image(model, shape) else None


# ------------------------------------------------------------------ the generator
@contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Generator:
    def __init__(self, model: ir.Model, shape: tuple[int, ...], convention: Convention | None = None,
                 route: str = "auto"):
        self.shape = shape
        self.convention = convention
        self.net = TorchGraph(model).eval()
        for p in self.net.buffers():
            p.requires_grad_(False)
        self.logits_name = _logits_value(model)
        bns = [(inp, mean.float(), torch.sqrt(var.float() + 1e-5)) for _, inp, mean, var in self.net.bn_nodes()]
        self.max_batch = _max_batch(self.net, model, shape)
        try:
            self.similarity, self.num_classes = _class_similarity(model)
            with torch.no_grad():
                probe = self.net.run(torch.zeros((1, *shape), device=self.net.device),
                                     capture=[self.logits_name])[self.logits_name]
            # class targets only where the output is one score per class (not an image, a sequence, boxes)
            self.classifier = probe.numel() == self.num_classes
        except CannotSynthesise:
            self.similarity, self.num_classes, self.classifier = torch.eye(1, device=self.net.device), 1, False
        self.source = _route(route, bool(bns), self.classifier, convention is not None)
        self.bns = bns if self.source == "bn-statistics" else []
        self.preacts = [] if self.bns else _conv_outputs(model)
        self.priors = BN_PRIORS if self.bns else OUTPUT_ONLY_PRIORS

    # targets ---------------------------------------------------------------
    def targets(self, count: int, gen: torch.Generator, start: int) -> torch.Tensor:
        k, cpu = self.num_classes, torch.device("cpu")      # drawn on the CPU: the same on any device
        classes = (torch.arange(start, start + count, device=cpu) % k)[torch.randperm(count, generator=gen, device=cpu)]
        lo, hi = (math.log(t) for t in TAU_RANGE)
        tau = torch.exp(lo + (hi - lo) * torch.rand(count, generator=gen, dtype=torch.float64, device=cpu)).float()
        on = self.similarity.device
        return torch.softmax(self.similarity[classes.to(on)] / tau[:, None].to(on), dim=1)

    # losses ----------------------------------------------------------------
    def losses(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {"bn": x.new_zeros(()), "act": x.new_zeros(())}
        hooks = {}

        def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dims = [0] + list(range(2, t.dim()))
            var, mean = torch.var_mean(t, dim=dims, correction=0)
            return mean, torch.sqrt(var + 1e-5)

        for name, mean_run, std_run in self.bns:
            def bn_hook(t, mean_run=mean_run, std_run=std_run, prev=hooks.get(name)):
                if prev is not None:
                    t = prev(t)
                mean, std = moments(t)
                terms["bn"] = terms["bn"] + torch.linalg.vector_norm(mean - mean_run) + \
                    torch.linalg.vector_norm(std - std_run)
                return t
            hooks[name] = bn_hook
        for name in self.preacts:
            def act_hook(t):
                rms = torch.sqrt(t.square().mean() + 1e-8)
                terms["act"] = terms["act"] + F.relu(torch.log(rms / ACT_RMS_LIMIT)).square()
                return t
            hooks[name] = act_hook
        out = self.net.run(x, capture=[self.logits_name], hooks=hooks)
        logits = out[self.logits_name].reshape(x.shape[0], -1)
        if self.classifier:
            terms["ce"] = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        else:
            terms["ce"] = x.new_zeros(())
        terms["tv"] = _total_variation(x)
        terms["l2"] = x.square().mean()
        mean, std = moments(x)
        m0, s0 = (0.0, 1.0) if self.convention is None or self.convention.standardised else self.convention.moments()
        terms["input"] = (torch.linalg.vector_norm(mean - m0) + torch.linalg.vector_norm(std - s0)) / s0
        if self.preacts:
            terms["act"] = terms["act"] / len(self.preacts)
        terms["logits"] = logits.detach()
        return terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = terms["bn"] + CE_WEIGHT * terms["ce"] + self.priors["tv"] * terms["tv"] + \
            self.priors["l2"] * terms["l2"]
        for key in ("act", "input"):
            if key in self.priors:
                loss = loss + self.priors[key] * terms[key]
        return loss

    # optimisation ----------------------------------------------------------
    def chunk(self, count: int, start: int, *, steps: int, seed: int, on_step=None):
        gen = torch.Generator().manual_seed(seed)
        target = self.targets(count, gen, start)
        down = INIT_DOWNSCALE if self.bns else OUTPUT_ONLY_INIT_DOWNSCALE
        x = _initial_images(count, self.shape, gen, down).to(self.net.device)
        lr = LR if self.bns else OUTPUT_ONLY_LR
        if self.convention is not None and not self.convention.standardised:
            mean, std = self.convention.moments()     # the same start, in the model's own range
            x, lr = x * std + mean, lr * std
        x = x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
        spatial = len(self.shape) - 1
        jitter = [max(1, int(s * JITTER_FRACTION)) for s in self.shape[1:]] if spatial >= 1 else []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            xa = x
            if jitter:
                shifts = [int(torch.randint(-j, j + 1, (1,), generator=gen, device="cpu")) for j in jitter]
                xa = torch.roll(xa, shifts=shifts, dims=list(range(2, 2 + spatial)))
                if spatial == 2 and bool(torch.rand(1, generator=gen, device="cpu") < 0.5):
                    xa = torch.flip(xa, dims=[3])
            opt.zero_grad(set_to_none=True)
            self.total(self.losses(xa, target)).backward()
            opt.step()
            if on_step is not None:
                on_step(step + 1)
        return x.detach(), target

    def run(self, n: int, *, steps: int, seed: int, batch_size: int, progress: ProgressFn,
            chunks: ChunkCache | None = None) -> SyntheticSet:
        """``n`` images, chunk by chunk; chunks already in ``chunks`` are read, new ones written."""
        natural = self.source == "natural"
        width = 0 if natural else self.num_classes
        images = np.empty((n, *self.shape), dtype=np.float32)
        targets = np.empty((n, width), dtype=np.float32)
        progress(STAGE, 0, n)
        if not natural:
            batch_size = min(batch_size, self.max_batch)
        for index, count in ChunkCache.sizes(n, batch_size):
            start = index * batch_size
            part = chunks.get(index, count) if chunks is not None else None
            if part is None:
                make = self.natural_chunk if natural else self.optimised_chunk
                x, y = make(count, start, index, steps=steps, seed=seed, n=n, progress=progress)
                part = SyntheticSet(images=x, targets=y, source=self.source, seed=seed)
                if chunks is not None:
                    chunks.put(index, count, part)
            images[start:start + count] = part.images
            targets[start:start + count] = part.targets
            progress(STAGE, start + count, n)
        return SyntheticSet(images=images, targets=targets, source=self.source, seed=seed)

    def optimised_chunk(self, count: int, start: int, index: int, *, steps: int, seed: int, n: int,
                        progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
        every = max(1, steps // 10)

        def on_step(step):
            if step % every == 0 and step < steps:
                progress(STAGE, start + count * step // steps, n)

        with _deterministic():
            x, y = self.chunk(count, start, steps=steps, seed=_chunk_seed(seed, index), on_step=on_step)
        return dev.numpy(x), dev.numpy(y)

    def natural_chunk(self, count: int, start: int, index: int, *, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
        """Procedural photographs in the model's input range (no optimisation)."""
        from . import natural

        u = natural.images(count, self.shape, seed=_chunk_seed(seed, index), soft_share=0.0)
        return self.convention.apply(u), np.zeros((count, 0), np.float32)

    def evaluate(self, images: np.ndarray, targets: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """Mean loss terms and top-1 agreement with the target class, for measurements."""
        sums: dict[str, float] = {}
        agree = 0
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = dev.tensor(images[start:start + batch_size])
                y = dev.tensor(targets[start:start + batch_size])
                terms = self.losses(x, y)
                agree += int((terms.pop("logits").argmax(1) == y.argmax(1)).sum())
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(x)
        result = {k: v / len(images) for k, v in sums.items()}
        result["top1_agreement"] = agree / len(images)
        return result


def _initial_images(count: int, shape: tuple[int, ...], gen: torch.Generator, down: int) -> torch.Tensor:
    """Unit-variance Gaussian noise, drawn at 1/down of the size and upsampled (smooth);
    on the CPU, as ``gen`` is (the same start on any device)."""
    if len(shape) != 3 or down <= 1:
        return torch.randn((count, *shape), generator=gen, device="cpu")
    low = [max(1, s // down) for s in shape[1:]]
    x = torch.randn((count, shape[0], *low), generator=gen, device="cpu")
    x = F.interpolate(x, size=list(shape[1:]), mode="bilinear", align_corners=False)
    return x / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _max_batch(net: TorchGraph, model: ir.Model, shape: tuple[int, ...]) -> int:
    """A fixed batch axis that the graph really depends on (e.g. Reshape to [1, -1]) caps chunks."""
    dims = model.graph.inputs[0].shape
    fixed = dims[0] if dims is not None and len(dims) and isinstance(dims[0], int) else None
    if fixed is None:
        return 1 << 30
    try:
        with torch.no_grad():
            net.run(torch.zeros((fixed + 1, *shape), device=net.device))
    except Exception:  # the graph hard-codes its batch size
        return fixed
    return 1 << 30


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    tv = x.new_zeros(())
    for d in range(2, x.dim()):
        if x.shape[d] > 1:
            tv = tv + (x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)).abs().mean()
    return tv


