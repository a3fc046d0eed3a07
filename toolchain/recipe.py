"""The recipe: the single, versioned description of what compression to do.

CLI options, the Python API and the model's ``metadata_props`` all speak it.  A
recipe read back from a compressed model's metadata reproduces that model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

RECIPE_VERSION = 1
METADATA_KEY = "datafree.recipe"
LAYERS_KEY = "datafree.layers"    # per-layer bits and channels the compressor wrote (read by the report)
CRITERIA = ("auto", "l1", "l2", "bn_l1", "output")
CLIPS = ("max", "mse")
SCOPES = ("auto", "layer", "global")
BUDGETS = ("auto", "full")
SYNTHETIC_ROUTES = ("auto", "bn-statistics", "output-only", "natural")
FLOAT = "float"  # how an unquantized wbits/abits is written in TOML
NONE = "none"    # how TOML (which has no null) spells None for a field whose default is not None


@dataclass
class LayerOverride:
    """Per-layer settings; ``None`` means "as the recipe says"."""

    prune: float | None = None
    wbits: int | None = None
    abits: int | None = None
    skip: bool = False


@dataclass
class DynamicConfig:
    """Dynamic precision: candidate bit-widths chosen per input by a selector."""

    bits: tuple[int, ...] = (4, 6, 8)
    target_bits: float = 5.0
    steps: int = 300
    groups: str = "stage"
    mode: str = "cascade"       # cascade: run low, rerun the uncertain at higher bits; upfront: choose from the stem
    bias_correction: bool = True   # cascade: each pass gets biases corrected on the synthetic images


@dataclass
class Recipe:
    version: int = RECIPE_VERSION
    prune: float = 0.0
    latency: float | None = None        # instead of prune: the smallest ratio whose closed-form model takes at
                                        # most this fraction of the float model's time here (stages/latency.py)
    prune_scope: str = "auto"           # "global": the MACs of the uniform ratio, removed where cheapest;
                                        # "layer": the same ratio in every layer; auto: global when
                                        # channels are chosen by output error, else layer
    criterion: str = "auto"             # auto: output error on synthetic images, l1 without them
    channel_multiple: int | str = "auto"  # kept channel counts a multiple of this; auto: 8 in wide
                                          # layers, 4 below (passes/prune.py:group_multiple)
    wbits: int | None = 8               # None: weights stay float
    depthwise_wbits: int | None = 8     # depthwise weights get at least these bits (None: as wbits);
                                        # their filters (k x k weights per channel) lose the most at 4 bits
                                        # and hold ~2 % of a MobileNet's weights
    abits: int | None = None            # None: activations stay float (weight-only output)
    int4: bool = True                   # store <= 4-bit weights as INT4 (opset 21)
    integer_kernels: bool = True        # 8-bit points before activations without integer kernels (SiLU, ...)
    reduce_range: bool = True           # 8-bit weights on integer kernels keep to +-63 (quant.KERNEL_SAFE_BITS):
                                        # x86 without VNNI saturates u8 x s8 pair sums beyond it
    clip: str = "max"
    compensation: bool = True           # UDFC next-layer compensation for pruned channels
    scale_compensation: bool = False    # UDFC s~ for quantized channels (measured to hurt; off)
    bias_correction: bool = True
    synthetic: int = 256                # synthetic images for fitting (0 = closed form only)
    synthetic_steps: int = 80           # the generator's default: ~40 s for 256 CIFAR images on 2 cores
    augment: bool = True                # also fit on mirrored and shifted copies (4-D image inputs)
    joint_steps: int = 300              # Adam steps fitting each pruned group with its consumers (0 = off)
    fit_budget: str = "auto"            # auto: models costlier per image than a CIFAR ResNet-56 get fewer
                                        # synthetic images and joint steps, in proportion; full: as given
    time_budget: float | None = None    # seconds (or "5m", "90s") for the whole compression: images, generator
                                        # and joint steps scaled down to fit it here (budget.py); replaces
                                        # fit_budget's scaling
    seed: int = 0
    input_shape: list[int] | None = None  # one input sample (C, H, W); None: the model's, or chosen where symbolic
    input_range: str | None = None        # the input's value convention (inputs.CONVENTIONS); None: inferred
    synthetic_route: str = "auto"         # how synthetic images are made (synth.ROUTES): auto, bn-statistics,
                                          # output-only or natural
    max_activation_loss: float | None = 3.0  # dB of output SQNR (held-out synthetic inputs) quantizing
                                          # activations may cost beyond the weights' own loss, unless the result
                                          # stays >= 30 dB (20 for class scores); the most damaging tensors stay
                                          # float. None: all as asked
    layers: dict[str, LayerOverride] = field(default_factory=dict)
    dynamic: DynamicConfig | None = None

    def __post_init__(self) -> None:
        self.layers = {k: v if isinstance(v, LayerOverride) else _override(k, v) for k, v in self.layers.items()}
        if isinstance(self.dynamic, dict):
            self.dynamic = _build(DynamicConfig, self.dynamic, "dynamic")
        if self.dynamic is not None:
            self.dynamic.bits = tuple(self.dynamic.bits)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        if self.version != RECIPE_VERSION:
            raise UserError(f"recipe version {self.version} is not supported (this is version {RECIPE_VERSION})")
        _check_ratio("prune", self.prune)
        if self.latency is not None:
            if isinstance(self.latency, bool) or not isinstance(self.latency, (int, float)) or \
                    not 0.0 < self.latency <= 1.0:
                raise UserError(f"latency must be a fraction of the float model's time in (0, 1], got {self.latency!r}")
            if self.prune:
                raise UserError("give prune or latency, not both: latency chooses the prune ratio")
            if self.dynamic is not None:
                raise UserError("latency cannot be used with dynamic precision (its time depends on each input)")
        _check_bits("wbits", self.wbits, allow_none=True)
        _check_bits("abits", self.abits, allow_none=True)
        _check_bits("depthwise_wbits", self.depthwise_wbits, allow_none=True)
        if self.criterion not in CRITERIA:
            raise UserError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.clip not in CLIPS:
            raise UserError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        if self.prune_scope not in SCOPES:
            raise UserError(f"prune_scope must be one of {', '.join(SCOPES)}, got {self.prune_scope!r}")
        if self.channel_multiple != "auto" and (not isinstance(self.channel_multiple, int)
                                                or isinstance(self.channel_multiple, bool) or self.channel_multiple < 1):
            raise UserError(f"channel_multiple must be 'auto' or a positive integer, got {self.channel_multiple!r}")
        if not isinstance(self.synthetic, int) or self.synthetic < 0:
            raise UserError(f"synthetic must be a non-negative number of images, got {self.synthetic!r}")
        if self.fit_budget not in BUDGETS:
            raise UserError(f"fit_budget must be one of {', '.join(BUDGETS)}, got {self.fit_budget!r}")
        if self.time_budget is not None:
            from .budget import parse_duration

            self.time_budget = parse_duration(self.time_budget)
        if self.input_shape is not None:
            if not isinstance(self.input_shape, (list, tuple)) or not self.input_shape or \
                    not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.input_shape):
                raise UserError(f"input_shape must be a list of positive integers, got {self.input_shape!r}")
            self.input_shape = [int(d) for d in self.input_shape]
        if self.input_range is not None:
            from .inputs import CONVENTIONS

            if self.input_range not in CONVENTIONS:
                raise UserError(f"input_range must be one of {', '.join(CONVENTIONS)}, got {self.input_range!r}")
        if self.synthetic_route not in SYNTHETIC_ROUTES:
            raise UserError(f"synthetic_route must be one of {', '.join(SYNTHETIC_ROUTES)}, got {self.synthetic_route!r}")
        if self.max_activation_loss is not None and (isinstance(self.max_activation_loss, bool) or
                                                     not isinstance(self.max_activation_loss, (int, float)) or
                                                     not self.max_activation_loss >= 0):
            raise UserError("max_activation_loss must be a non-negative number of dB or none, "
                            f"got {self.max_activation_loss!r}")
        if not isinstance(self.joint_steps, int) or self.joint_steps < 0:
            raise UserError(f"joint_steps must be a non-negative number of steps, got {self.joint_steps!r}")
        for name, o in self.layers.items():
            _check_ratio(f"layers.{name}.prune", o.prune, allow_none=True)
            _check_bits(f"layers.{name}.wbits", o.wbits, allow_none=True)
            _check_bits(f"layers.{name}.abits", o.abits, allow_none=True)
        if self.dynamic is not None:
            bits = list(self.dynamic.bits)
            if not bits:
                raise UserError("dynamic.bits must list at least one bit-width")
            for b in bits:
                _check_bits("dynamic.bits", b)
            if bits != sorted(set(bits)):
                raise UserError(f"dynamic.bits must be sorted and without duplicates, got {bits}")
            if self.dynamic.mode not in ("cascade", "upfront"):
                raise UserError(f"dynamic.mode must be 'cascade' or 'upfront', got {self.dynamic.mode!r}")
            if not bits[0] <= self.dynamic.target_bits <= bits[-1]:
                raise UserError(f"target_bits {self.dynamic.target_bits} is outside the candidate range {bits[0]}..{bits[-1]}")

    # ------------------------------------------------------------- per layer
    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """The per-layer patterns that select none of ``names`` (as :meth:`for_layer` matches)."""
        return [pat for pat in self.layers
                if pat not in names and not any(fnmatch.fnmatchcase(n, pat) for n in names)]

    def for_layer(self, name: str, kind: str | None = None) -> LayerOverride:
        """The effective settings of one layer (exact name first, then patterns in order);
        a depthwise layer (``kind``) without its own wbits gets at least ``depthwise_wbits``."""
        eff = LayerOverride(prune=self.prune, wbits=self.wbits, abits=self.abits)
        matches = [o for pat, o in self.layers.items() if pat == name] or \
                  [o for pat, o in self.layers.items() if fnmatch.fnmatchcase(name, pat)]
        if kind == "depthwise" and self.wbits is not None and self.depthwise_wbits is not None and \
                all(o.wbits is None for o in matches):
            eff = dataclasses.replace(eff, wbits=max(self.wbits, self.depthwise_wbits))
        for o in matches:
            eff = LayerOverride(
                prune=eff.prune if o.prune is None else o.prune,
                wbits=eff.wbits if o.wbits is None else o.wbits,
                abits=eff.abits if o.abits is None else o.abits,
                skip=eff.skip or o.skip,
            )
        return eff

    # --------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = {k: {kk: vv for kk, vv in v.items() if vv is not None and vv is not False}
                       for k, v in d["layers"].items()}
        if d["dynamic"] is not None:
            d["dynamic"]["bits"] = list(d["dynamic"]["bits"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_toml(self) -> str:
        import tomli_w

        d = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in [k for k, v in d.items() if v is None]:     # TOML has no null
            if key in ("wbits", "abits"):
                d[key] = FLOAT
            elif defaults.get(key) is None:
                del d[key]
            else:
                d[key] = NONE
        return tomli_w.dumps(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if isinstance(d, dict):
            d = {k: (None if (k in ("wbits", "abits") and v == FLOAT) or (k in _SPELLED_NONE and v == NONE) else v)
                 for k, v in d.items()}
        return _build(cls, d, "recipe")

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UserError(f"recipe is not valid JSON: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: recipe file not found")
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_json(text)
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: recipe is not valid TOML: {exc}") from None

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


_SPELLED_NONE = {f.name for f in dataclasses.fields(Recipe) if f.default is not None}


def _build(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a table, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None


def _override(name: str, v: Any) -> LayerOverride:
    return _build(LayerOverride, v, f"layers.{name}")


def _check_ratio(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
        raise UserError(f"{name} must be a ratio in [0, 1), got {v!r}")


def _check_bits(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
        raise UserError(f"{name} must be an integer number of bits in 2..8, got {v!r}")
