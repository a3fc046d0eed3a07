"""Device profiles and the per-layer roofline estimate of latency and energy.

A profile (``toolchain/targets/*.toml`` or a user's file) lists the precisions the
device runs natively with their peak MAC rate and energy per MAC, the memory
bandwidth, on-chip memory and energy per byte moved.  Precisions are ``fp32``,
``fp16`` and ``wXaY`` (X-bit weights times Y-bit activations).

Per layer: ``latency = max(MACs / peak[precision], bytes / bandwidth)``, where the
bytes are the weights at their stored precision plus the activations when a
layer's input and output do not fit on chip; ``energy = MACs * pJ/MAC + bytes *
pJ/byte``.  A layer whose bits the device has no kernel for runs at the next wider
native precision (4-bit weights on an int8 CPU run as int8), and is flagged.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from datafree.toolchain.errors import UserError

from .cost import FLOAT_BITS, LayerCost, storage_bits

_PRECISION = re.compile(r"^(fp32|fp16|w(\d+)a(\d+))$")
_NUMBERS = {"bandwidth_gb_s": "memory bandwidth in GB/s", "onchip_kib": "on-chip memory in KiB",
            "energy_pj_per_byte": "energy per byte moved in pJ"}


@dataclass
class Target:
    name: str
    kind: str
    description: str
    bandwidth_gb_s: float
    onchip_kib: float
    energy_pj_per_byte: float
    peak_gmacs: dict[str, float]
    energy_pj_per_mac: dict[str, float]
    fallback_gmacs: float | None = None
    fallback_pj_per_mac: float | None = None
    source: str = ""

    @property
    def precisions(self) -> list[str]:
        return list(self.peak_gmacs)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "description", "bandwidth_gb_s", "onchip_kib",
                                               "energy_pj_per_byte", "peak_gmacs", "energy_pj_per_mac",
                                               "fallback_gmacs", "fallback_pj_per_mac", "source")}


# ------------------------------------------------------------------ loading
def _builtin_dir():
    return resources.files("datafree.toolchain").joinpath("targets")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def builtin_targets() -> list[Target]:
    return [load_target(n) for n in builtin_names()]


def load_target(spec: str | Path) -> Target:
    """A built-in profile by name, ``host`` (this machine, :mod:`.host`), or a profile file by path."""
    text_path = str(spec)
    if text_path.endswith(".toml") or "/" in text_path or Path(text_path).exists():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"{path}: target file not found")
        return parse_target(path.read_text(), str(path))
    if text_path == "host":
        from .host import host_target

        return host_target()
    names = builtin_names()
    if text_path not in names:
        raise UserError(f"unknown target {text_path!r}; known targets: {', '.join(names)}, host (this machine, "
                        f"measured) or a path to a .toml file")
    return parse_target(_builtin_dir().joinpath(f"{text_path}.toml").read_text(), f"built-in {text_path}")


def parse_target(text: str, where: str = "target") -> Target:
    """Validate a profile; every problem names the field."""
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where}: not valid TOML ({exc})") from None
    for key in ("name", "kind", "description"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise UserError(f"{where}: field {key!r} is missing or not a string")
    for key, what in _NUMBERS.items():
        _number(d, key, where, what)
    peak = _table(d, "peak_gmacs", where)
    energy = _table(d, "energy_pj_per_mac", where, positive=False)
    missing = sorted(set(peak) - set(energy))
    if missing:
        raise UserError(f"{where}: field 'energy_pj_per_mac.{missing[0]}' is missing (peak_gmacs lists it)")
    fb = d.get("fallback_gmacs")
    if fb is not None:
        _number(d, "fallback_gmacs", where, "fallback MAC rate in GMAC/s")
        _number(d, "fallback_pj_per_mac", where, "fallback energy per MAC in pJ", positive=False)
    known = {"name", "kind", "description", "peak_gmacs", "energy_pj_per_mac", "fallback_gmacs",
             "fallback_pj_per_mac", *_NUMBERS}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}")
    return Target(name=d["name"], kind=d["kind"], description=d["description"],
                  bandwidth_gb_s=float(d["bandwidth_gb_s"]), onchip_kib=float(d["onchip_kib"]),
                  energy_pj_per_byte=float(d["energy_pj_per_byte"]), peak_gmacs=peak,
                  energy_pj_per_mac={k: float(energy[k]) for k in peak},
                  fallback_gmacs=None if fb is None else float(fb),
                  fallback_pj_per_mac=None if fb is None else float(d["fallback_pj_per_mac"]), source=where)


def _number(d: dict, key: str, where: str, what: str, positive: bool = True) -> float:
    v = d.get(key)
    if v is None:
        raise UserError(f"{where}: field {key!r} ({what}) is missing")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise UserError(f"{where}: field {key!r} must be a {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


def _table(d: dict, key: str, where: str, positive: bool = True) -> dict[str, float]:
    t = d.get(key)
    if not isinstance(t, dict) or not t:
        raise UserError(f"{where}: field {key!r} is missing or empty (a table of precision = number)")
    for prec in t:
        if not _PRECISION.match(prec):
            raise UserError(f"{where}: field '{key}.{prec}' is not a precision (fp32, fp16 or wXaY such as w8a8)")
        _number(t, prec, f"{where}: {key}", "number")
    return {k: float(v) for k, v in t.items()}


# ---------------------------------------------------------------- precision
def _int_pairs(target: Target) -> list[tuple[int, int, str]]:
    out = []
    for p in target.peak_gmacs:
        m = _PRECISION.match(p)
        if m.group(2):
            out.append((int(m.group(2)), int(m.group(3)), p))
    return out


def requested(wbits: int, abits: int) -> str:
    if wbits >= FLOAT_BITS:
        return "fp32"
    return f"w{wbits}a{abits}" if abits < FLOAT_BITS else f"w{wbits}a-float"


def run_precision(target: Target, wbits: int, abits: int) -> tuple[str | None, bool]:
    """(precision the device runs the layer at, native?); None = not on this device."""
    want = requested(wbits, abits)
    if want in target.peak_gmacs:
        return want, True
    if wbits < FLOAT_BITS and abits < FLOAT_BITS:
        wider = [(w, a, p) for w, a, p in _int_pairs(target) if w >= wbits and a >= abits]
        if wider:
            return max(wider, key=lambda t: (target.peak_gmacs[t[2]], -t[0] - t[1]))[2], False
    for p in ("fp16", "fp32") if wbits < FLOAT_BITS else ("fp32", "fp16"):
        if p in target.peak_gmacs:
            return p, False
    return None, False


def _act_bits(precision: str | None) -> int:
    """Width the activations travel at when the layer runs at ``precision``."""
    if precision == "fp16":
        return 16
    if precision in ("fp32", None):
        return FLOAT_BITS
    return storage_bits(int(_PRECISION.match(precision).group(3)))


@dataclass
class LayerEstimate:
    name: str
    requested: str
    runs_as: str              # precision, or "host" when the device cannot run it
    native: bool
    macs: int
    bytes_moved: float
    compute_s: float
    memory_s: float
    energy_j: float

    @property
    def latency_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s > self.compute_s else "compute"


@dataclass
class Estimate:
    target: str
    layers: list[LayerEstimate] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return sum(l.latency_s for l in self.layers)

    @property
    def energy_j(self) -> float:
        return sum(l.energy_j for l in self.layers)

    @property
    def not_native(self) -> list[LayerEstimate]:
        return [l for l in self.layers if not l.native]


def estimate_layer(target: Target, c: LayerCost) -> LayerEstimate:
    """Roofline latency and energy of one layer on ``target``."""
    prec, native = run_precision(target, c.wbits, c.abits)
    if prec is None:
        if target.fallback_gmacs is None:
            raise UserError(f"target {target.name!r} runs none of {requested(c.wbits, c.abits)}, fp16, fp32 "
                            f"and has no 'fallback_gmacs' for layer {c.name!r}")
        rate, pj_mac, runs = target.fallback_gmacs, target.fallback_pj_per_mac, "host"
    else:
        rate, pj_mac, runs = target.peak_gmacs[prec], target.energy_pj_per_mac[prec], prec
    act_bits = _act_bits(prec)
    act_bytes = (c.act_in + c.act_out) * act_bits / 8.0
    moved = c.weight_bytes + (act_bytes if act_bytes > target.onchip_kib * 1024 else 0.0)
    compute = c.macs / (rate * 1e9)
    memory = moved / (target.bandwidth_gb_s * 1e9)
    energy = (c.macs * pj_mac + moved * target.energy_pj_per_byte) * 1e-12
    return LayerEstimate(c.name, requested(c.wbits, c.abits), runs, native, c.macs, moved, compute, memory, energy)


def estimate(target: Target, costs: list[LayerCost]) -> Estimate:
    return Estimate(target.name, [estimate_layer(target, c) for c in costs])
