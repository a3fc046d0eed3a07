"""The synthetic-image cache: images on disk, chunk by chunk, keyed by the model's bytes
and every argument the images depend on (not their number), so a second compression of
the same model, at any bits or prune ratio, reads them instead of generating them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .inputs import Convention

# Bump when the generated images change for the same arguments: old cache entries die.
GENERATOR_VERSION = 6


@dataclass
class SyntheticSet:
    images: np.ndarray      # float32, N x C x H x W, in the model's input space (already normalised)
    targets: np.ndarray     # float32, N x K soft labels used for generation
    source: str             # "bn-statistics", "natural" or "output-only" (how they were made), or "caller"
    seed: int


def chunk_cache(model: ir.Model, shape: tuple[int, ...], convention: Convention | None, route: str, *,
                steps: int, seed: int, batch_size: int, cache_dir: str | Path | None) -> "ChunkCache":
    """The chunk cache of these arguments: keyed by what the images depend on, not by their number."""
    extra = {"convention": convention.name} if convention is not None and not convention.standardised else {}
    if route != "auto":
        extra["route"] = route
    key = cache_key(model, steps=steps, seed=seed, batch_size=batch_size, shape=shape, **extra)
    root = _cache_root(cache_dir)
    return ChunkCache(lambda index, count: root / f"synth-{key[:40]}-{index}-{count}.npz")


class ChunkCache:
    """Chunks of generated images on disk, one file per (chunk index, size): a chunk does
    not depend on how many images were asked for, so a later call for more (or fewer)
    images of the same model and settings, e.g. W4A8 after W8A8, reuses what was made."""

    def __init__(self, path_of):
        self.path_of = path_of

    def get(self, index: int, count: int) -> SyntheticSet | None:
        return _load(self.path_of(index, count))

    def put(self, index: int, count: int, chunk: SyntheticSet) -> None:
        _save(self.path_of(index, count), chunk)

    @staticmethod
    def sizes(n: int, batch_size: int) -> list[tuple[int, int]]:
        """(index, count) of the chunks ``n`` images are made in."""
        return [(index, min(batch_size, n - start)) for index, start in enumerate(range(0, n, batch_size))]

    def on_disk(self, n: int, batch_size: int) -> bool:
        """Whether every chunk of the ``n`` images is on disk (read by :meth:`whole`)."""
        return all(self.path_of(index, count).exists() for index, count in self.sizes(n, batch_size))

    def whole(self, n: int, batch_size: int) -> SyntheticSet | None:
        """The ``n`` images if every chunk is on disk."""
        parts = []
        for index, count in self.sizes(n, batch_size):
            part = self.get(index, count)
            if part is None:
                return None
            parts.append(part)
        return SyntheticSet(images=np.concatenate([p.images for p in parts]),
                            targets=np.concatenate([p.targets for p in parts]), source=parts[0].source,
                            seed=parts[0].seed)


def cache_key(model: ir.Model, **args) -> str:
    h = hashlib.sha256()
    h.update(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    h.update(json.dumps({"version": GENERATOR_VERSION, **{k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in sorted(args.items())}},
                        sort_keys=True).encode())
    return h.hexdigest()


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DATAFREE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "datafree"


def _load(path: Path) -> SyntheticSet | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return SyntheticSet(images=data["images"], targets=data["targets"],
                                source=str(data["source"]), seed=int(data["seed"]))
    except Exception:  # a damaged cache entry is regenerated, never fatal
        return None


def _save(path: Path, result: SyntheticSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=result.images, targets=result.targets,
                         source=np.array(result.source), seed=np.array(result.seed))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:  # an unwritable cache only costs time
        pass
