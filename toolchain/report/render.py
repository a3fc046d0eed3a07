"""Render a report document: report.json, report.md, plots (PNG + SVG) and rich tables.

Rendering only formats numbers that ``build_report`` computed; it computes none.
"""

from __future__ import annotations

import math
from pathlib import Path

from datafree.toolchain.errors import UserError


# ------------------------------------------------------------------ formats
def short(name: str) -> str:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0/conv1``."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1 and parts[-1] in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
        parts = parts[:-1]
    if len(parts) > 1 and parts[1].startswith(parts[0] + "."):
        parts = parts[1:]
    return "/".join(parts) or name


def si(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.2f} {prefix}{unit}".rstrip()
    return f"{v:.0f} {unit}".rstrip()


def seconds(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.3g} ms"
    if v >= 1e-6:
        return f"{v * 1e6:.3g} µs"
    return f"{v * 1e9:.3g} ns"


def joules(v: float | None) -> str:
    if v is None:
        return "–"
    for factor, unit in ((1, "J"), (1e-3, "mJ"), (1e-6, "µJ")):
        if v >= factor:
            return f"{v / factor:.3g} {unit}"
    return f"{v * 1e9:.3g} nJ"


def db(v: float | None) -> str:
    """An SQNR in dB; null in the document means the approximation was exact."""
    return "∞" if v is None else f"{v:.2f}"


def _db1(v: float | None) -> str:
    return "∞" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------ tables
def summary_rows(doc: dict) -> list[tuple[str, str]]:
    m, t, tot = doc["model"], doc["target"], doc["totals"]
    rows = [("model", m["name"]), ("target", f"{t['name']}: {t['description']}"),
            ("MACs / sample", si(tot["macs"])), ("BOPs as stored", si(tot["bops"])),
            ("FP32 BOPs", si(tot["fp32_bops"])), ("parameters", si(tot["params"])),
            ("weight bytes", si(tot["weight_bytes"], "B")),
            ("latency (estimate)", seconds(tot["latency_s"])), ("energy / inference (estimate)", joules(tot["energy_j"]))]
    if doc["reference"]:
        rows.insert(1, ("reference", doc["reference"]["name"]))
    if doc["probes"]:
        rows.append(("probes", doc["probes"]["source"]))
    out = doc.get("output_sqnr")
    if out and out["end_to_end"]["sqnr_db"] is not None or (out and out["end_to_end"]["top1_agreement"] is not None):
        e = out["end_to_end"]
        rows.append(("end-to-end output SQNR", f"{db(e['sqnr_db'])} dB"))
        if e["top1_agreement"] is not None:
            rows.append(("top-1 agreement with reference", f"{100 * e['top1_agreement']:.1f} %"))
    dyn = doc.get("dynamic")
    if dyn and "skipped" not in dyn:
        rows.append(("dynamic: expected BOPs", f"{si(dyn['expected_bops'])} (min {si(dyn['min_bops'])}, "
                                               f"max {si(dyn['max_bops'])}; selector {si(dyn['selector_bops'])})"))
    meas = doc.get("measured")
    if meas:
        rows.append(("measured time (this machine)", measured_line(meas)))
        if meas.get("estimate_check"):
            rows.append(("estimate vs onnxruntime's profile", check_line(meas["estimate_check"])))
    return rows


def measured_line(meas: dict) -> str:
    """Each batch's median time, as a ratio to the reference's where there is one."""
    parts = []
    for b, v in meas["batches"].items():
        ratio = f" ({v['ratio']:.2f}x the reference's)" if "ratio" in v else ""
        parts.append(f"batch {b}: {seconds(v['ms'] / 1e3)}{ratio}")
    return "; ".join(parts) + f" ({meas['machine']})"


def check_line(c: dict) -> str:
    total = "" if c["total_error"] is None else f" ({100 * c['total_error']:+.0f} %)"
    factor = "" if c["layer_error_median"] is None else \
        f"; per layer off by a factor of {math.exp(c['layer_error_median']):.2f} (median)"
    return (f"estimated {seconds(c['estimate_s'])} against {seconds(c['measured_s'])} measured over the layers"
            f"{total}{factor}; {seconds(c['other_s'])} in kernels of no layer")


def choice_rows(doc: dict) -> list[list[str]]:
    return [[c["choice"], si(c["bops"]), si(c["weight_bytes"], "B"), seconds(c["latency_s"]), joules(c["energy_j"]),
             str(len(c["not_native"])) + (f" (run as {_first(c['not_native'])})" if c["not_native"] else "")]
            for c in doc["choices"]]


def _first(d: dict) -> str:
    return sorted({v.split(" runs as ")[-1] for v in d.values()})[0] if d else ""


def layer_rows(doc: dict, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Per-layer table; ``compact`` drops the precision and latency columns (terminal)."""
    bits = list(doc["weight_sqnr_summary"])
    ws = {(r["layer"], str(r["bits"])): r for r in doc["weight_sqnr"]}
    out_db = {r["layer"]: r["sqnr_db"] for r in (doc["output_sqnr"] or {}).get("layers", [])}
    head = ["layer", "MACs", "precision", "runs as", "latency"]
    head += [f"W{b} q/p dB" for b in bits] + ["kurt."]
    actual = doc.get("weight_sqnr_actual") or {}
    if actual:
        head.append("weight dB")
    if doc["output_sqnr"]:
        head.append("output dB")
    rows = []
    for l in doc["layers"]:
        r = [short(l["name"]), si(l["macs"]), l["precision"], l["runs_as"] + ("" if l["native"] else " *"),
             seconds(l["latency_s"])]
        k = None
        for b in bits:
            w = ws.get((l["name"], b))
            r.append("–" if w is None else f"{_db1(w['quant_db'])}/{_db1(w['prune_db'])}" +
                     (" P" if w["winner"] == "prune" else ""))
            k = w["kurtosis"] if w else k
        r.append("–" if k is None else f"{k:.1f}")
        if actual:
            r.append(db(actual[l["name"]]) if l["name"] in actual else "–")
        if doc["output_sqnr"]:
            skipped = doc["output_sqnr"]["skipped"].get(l["name"])
            r.append(db(out_db[l["name"]]) if l["name"] in out_db else ("pruned" if skipped and skipped.startswith("pruned") else "–"))
        rows.append(r)
    if compact:
        keep = [i for i, h in enumerate(head) if h not in ("precision", "latency")]
        head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
        head = [h.replace(" q/p dB", " q/p").replace("runs as", "runs") for h in head]
        rows = [[r[0], r[1].replace(" ", "").replace(".00", "")] + [c.replace(" *", "*") for c in r[2:]] for r in rows]
    return head, rows


def bounds_rows(doc: dict) -> list[list[str]]:
    b = doc.get("bounds") or {}
    rows = []
    for r in b.get("layers", []):
        p = r["prune"]
        prune = "–" if not p else (f"{_ratio_db(p['reference'], p['magnitude'])}/"
                                   f"{_ratio_db(p['reference'], p['magnitude_refit'])}/"
                                   f"{_ratio_db(p['reference'], p['optimal'])}")
        rows.append([short(r["layer"]), str(r["bits"]), str(r["n"]), f"{r['channels']}/{r['out_channels']}",
                     db(r["rtn_db"]), db(r["best_db"]), db(r["limit_db"]), prune, f"{r['seconds']:.1f} s"])
    return rows


def _ratio_db(ref: float, err: float) -> str:
    return "∞" if err <= 0 else f"{10 * math.log10(ref / err):.1f}"


# ---------------------------------------------------------------- markdown
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict, plots: list[str] = ()) -> str:
    mode = "what it cost" if doc["mode"] == "after" else "what each choice would cost"
    parts = [f"# Compression report: {doc['model']['name']} ({mode})", ""]
    parts += [f"> **warning**: {w}" for w in doc.get("warnings", [])] + ([""] if doc.get("warnings") else [])
    parts += [_md_table(["", ""], [list(r) for r in summary_rows(doc)]), ""]
    parts += ["## Cost on the target", "",
              _md_table(["choice", "BOPs", "weights", "latency", "energy", "layers not native"], choice_rows(doc)), ""]
    native = [c for c in doc["choices"] if c["not_native"]]
    if native:
        parts.append("Layers the target cannot run at the chosen bits (and what it runs them as):")
        parts.append("")
        for c in native:
            parts.append(f"- **{c['choice']}**: " + "; ".join(
                f"{short(k)} {v}" for k, v in list(c["not_native"].items())[:6]) +
                (f"; … {len(c['not_native']) - 6} more" if len(c["not_native"]) > 6 else ""))
        parts.append("")
    head, rows = layer_rows(doc)
    parts += ["## Per layer", "",
              "`q/p`: weight SQNR of per-channel quantization / magnitude pruning at equal size "
              "(sparsity 1 − b/16), `P` where pruning wins; kurtosis 3 = Gaussian; `*`: not native on the target; "
              "`weight dB`: SQNR of the compressed weights against the reference (unpruned layers); "
              "`output dB`: output SQNR against the reference on the probes.",
              "", _md_table(head, rows), ""]
    s = doc["weight_sqnr_summary"]
    parts += ["Pruning beats quantization on " + ", ".join(
        f"{v['prune_wins']}/{v['layers']} layers at {b} bits" for b, v in s.items()) + ".", ""]
    out = doc.get("output_sqnr")
    if out:
        parts += ["## Output SQNR against the reference", "", f"Compared at {out['compared_at']}.", ""]
        if out["skipped"]:
            parts += [f"- {short(k)}: {v}" for k, v in out["skipped"].items()] + [""]
    if doc.get("dynamic"):
        d = doc["dynamic"]
        parts += ["## Dynamic precision", ""]
        parts += [f"- {d['skipped']}"] if "skipped" in d else [
            f"- expected BOPs {si(d['expected_bops'])} (min {si(d['min_bops'])}, max {si(d['max_bops'])}) "
            f"over {d['images']} probes; mean bits per group {d['mean_bits']}",
            f"- selector: {si(d['selector_macs'])} MACs, {si(d['selector_bops'])} BOPs (pooling + MLP in float), "
            f"{si(d['selector_params'])} parameters"] + ([f"- {d['note']}"] if d.get("note") else [])
        parts.append("")
    if doc.get("bounds") is not None:
        b = doc["bounds"]
        parts += ["## How good can rounding be? (output SQNR bounds per channel)", "",
                  "RTN: round to nearest. Best: best integer solution found (randomized rounding of the SDP "
                  "solution + greedy coordinate descent). Limit: no rounding can exceed it (SDP lower bound on "
                  "the error). Pruning: magnitude / magnitude + refit / exact optimum at sparsity 1 − b/16.", "",
                  _md_table(["layer", "bits", "n", "channels", "RTN dB", "best dB", "limit dB", "pruning dB", "time"],
                            bounds_rows(doc)), ""]
        if b["skipped"]:
            parts += ["Skipped:", ""] + [f"- {short(k)}: {v}" for k, v in b["skipped"].items()] + [""]
        notes = [(r["layer"], n) for r in b["layers"] for n in (r.get("note"), r["prune_note"]) if n]
        parts += [f"- {short(k)}: {n}" for k, n in notes] + ([""] if notes else [])
    if doc.get("measured"):
        m = doc["measured"]
        parts += ["## Measured", "", f"Median time: {measured_line(m)}."]
        c = m.get("estimate_check")
        if c:
            parts += ["", f"The estimate for this machine against onnxruntime's own profile at batch 1: "
                      f"{check_line(c)}.", "",
                      _md_table(["layer", "estimated", "measured", "estimate / measured"],
                                [[short(r["name"]), seconds(r["estimate_s"]), seconds(r["measured_s"]),
                                  f"{r['estimate_s'] / r['measured_s']:.2f}" if r["measured_s"] else "–"]
                                 for r in c["layers"]])]
        else:
            parts += ["", f"(The estimate above is for {doc['target']['name']}, not this machine: "
                      f"`--target host` estimates this machine and checks the estimate here.)"]
        parts += [""]
    parts += ["## Assumptions", ""] + [f"- {a}" for a in doc["assumptions"]] + [
        f"- Target numbers: {doc['target']['source']} (each with its source in the profile file)."]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots if p.endswith(".svg")]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------- plots
def plot(doc: dict, out_dir: Path) -> list[str]:
    """sqnr.{png,svg}: quantization vs pruning per layer; cost.{png,svg}: BOPs and latency per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np

    names = [short(l["name"]) for l in doc["layers"]]
    x = np.arange(len(names))
    written = []
    bits = list(doc["weight_sqnr_summary"])
    ws = {(r["layer"], str(r["bits"])): r for r in doc["weight_sqnr"]}
    rows = len(bits) + (1 if doc.get("output_sqnr") else 0)
    fig = Figure(figsize=(max(8, 0.45 * len(names) + 2), 2.6 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax, b in zip(axes, bits):
        q = [_num(ws.get((l["name"], b), {}).get("quant_db")) for l in doc["layers"]]
        p = [_num(ws.get((l["name"], b), {}).get("prune_db")) for l in doc["layers"]]
        ax.bar(x - 0.2, q, 0.4, label=f"quantization {b} bit")
        ax.bar(x + 0.2, p, 0.4, label=f"pruning {100 * (1 - int(b) / 16):.0f} %")
        ax.set_ylabel("weight SQNR (dB)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        ax.set_xticks(x, [""] * len(x))
    if doc.get("output_sqnr"):
        ax = axes[-1]
        got = {r["layer"]: r["sqnr_db"] for r in doc["output_sqnr"]["layers"]}
        ax.bar(x, [got.get(l["name"]) if got.get(l["name"]) is not None else np.nan for l in doc["layers"]],
               0.6, color="tab:green", label="output SQNR vs reference")
        ax.set_ylabel("output SQNR (dB)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    axes[-1].set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    fig.suptitle(f"{doc['model']['name']}: SQNR per layer")
    fig.tight_layout()
    written += _save(fig, out_dir, "sqnr")

    labels = [c["choice"] for c in doc["choices"]]
    fig = Figure(figsize=(max(8, 0.45 * len(names) + 2), 6.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        off = (i - (len(labels) - 1) / 2) * width
        ax1.bar(x + off, [l["choices"].get(label, {}).get("bops", np.nan) for l in doc["layers"]], width, label=label)
        ax2.bar(x + off, [1e6 * l["choices"].get(label, {}).get("latency_s", np.nan) for l in doc["layers"]], width,
                label=label)
    ax1.set_yscale("log")
    ax1.set_ylabel("BOPs")
    ax1.legend(loc="lower right", fontsize=8, ncol=len(labels), framealpha=0.9)
    ax1.set_xticks(x, [""] * len(x))
    ax2.set_ylabel(f"latency on {doc['target']['name']} (µs)")
    ax2.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    fig.suptitle(f"{doc['model']['name']}: cost per layer (estimate)")
    fig.tight_layout()
    written += _save(fig, out_dir, "cost")
    return written


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _save(fig, out_dir: Path, stem: str) -> list[str]:
    out = []
    for ext in ("png", "svg"):
        fig.savefig(out_dir / f"{stem}.{ext}", dpi=120)
        out.append(f"{stem}.{ext}")
    return out


# -------------------------------------------------------------- the folder
def prepare_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    return out


def write_report(report, out_dir, plots: bool = True) -> list[Path]:
    out = prepare_dir(out_dir)
    names = plot(report.doc, out) if plots else []
    (out / "report.json").write_text(report.to_json() + "\n")
    (out / "report.md").write_text(markdown(report.doc, names))
    return [out / "report.md", out / "report.json"] + [out / n for n in names]


# -------------------------------------------------------------- terminal
def console(stderr: bool = False):
    """A rich console; when the output is not a terminal (a pipe, a log), 120 columns wide."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 120)


def print_summary(doc: dict, console=None) -> None:
    from rich import box
    from rich.table import Table

    console = console or globals()["console"]()
    for w in doc.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}")
    t = Table(title="datafree report", show_header=False)
    for k, v in summary_rows(doc):
        t.add_row(k, v)
    console.print(t)
    t = Table(title=f"cost on {doc['target']['name']} (estimate)")
    for h in ["choice", "BOPs", "weights", "latency", "energy", "not native"]:
        t.add_column(h, justify="right" if h not in ("choice",) else "left")
    for r in choice_rows(doc):
        t.add_row(*r)
    console.print(t)
    head, rows = layer_rows(doc, compact=True)
    t = Table(title="per layer (q/p: weight SQNR dB quantization/pruning, P = pruning wins, * = not native)",
              box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for h in head:
        t.add_column(h, justify="left" if h == "layer" else "right", no_wrap=True,
                     min_width=14 if h == "layer" else None, overflow="ellipsis")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if doc.get("bounds") is not None:
        t = Table(title="rounding bounds (output SQNR dB)")
        for h in ["layer", "bits", "n", "channels", "RTN", "best", "limit", "prune m/m+fit/opt", "time"]:
            t.add_column(h, justify="left" if h == "layer" else "right")
        for r in bounds_rows(doc):
            t.add_row(*r)
        console.print(t)
        for k, v in doc["bounds"]["skipped"].items():
            console.print(f"  bounds skipped {short(k)}: {v}")
