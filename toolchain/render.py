"""Terminal output for the CLI: one progress bar for every long task, and tables."""

from __future__ import annotations

import contextlib
import re

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

console = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def progress_bar(quiet: bool = False):
    """Yield a ``progress(stage, done, total)`` callback drawing one rich task per stage."""
    if quiet:
        yield lambda stage, done, total: None
        return
    if not console.is_terminal:   # a log (CI, a pipeline): plain lines, see _log_lines
        yield _log_lines()
        return
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def _log_lines(every: float = 10.0):
    """``progress`` for output that is not a terminal (a log, CI, a pipeline): a line every
    ``every`` seconds while a stage runs and one when it is done (none for a stage that
    fails, so a bad input still gets its one line)."""
    import time

    started: dict[str, float] = {}
    last: dict[str, float] = {}

    def update(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage not in started:
            started[stage] = last[stage] = now
        if done >= total and last[stage] != float("inf"):
            last[stage] = float("inf")
            console.print(f"{stage}: done in {now - started[stage]:.1f} s", highlight=False, soft_wrap=True)
        elif now - last[stage] >= every and done < total:
            last[stage] = now
            spent = now - started[stage]
            left = f", about {spent * (total - done) / done:.0f} s left" if done else ""
            console.print(f"{stage}: {done}/{total} ({spent:.0f} s{left})", highlight=False, soft_wrap=True)

    return update


def _fmt_m(x) -> str:
    return "?" if x is None else f"{x / 1e6:.2f}M"


def _bits(b) -> str:
    return "fp32" if b is None else str(b)


def print_summary(summary, output=None, *, dry_run: bool = False, dynamic: dict | None = None,
                  verbose: bool = False) -> None:
    """What matters first (input assumed, how images were made), totals, what was left alone
    grouped by reason, notes; the per-layer table with ``verbose``."""
    for line in summary.headline:
        out.print(line, highlight=False)
    tot = summary.totals
    if tot:
        mb = tot["macs_before"] or 0
        quantized = sum(1 for r in summary.rows if r.wbits is not None)
        pruned = sum(1 for r in summary.rows if r.channels_after < r.channels_before)
        out.print(f"{len(summary.rows)} layers: {pruned} pruned, {quantized} with quantized weights", highlight=False)
        out.print(f"MACs {_fmt_m(tot['macs_before'])} → {_fmt_m(tot['macs_after'])}"
                  f" ({100 * (1 - tot['macs_after'] / mb):.1f} % fewer)" if mb else "")
        out.print(f"weights {tot['weight_bytes_before'] / 1024:.0f} KiB → {tot['weight_bytes_after'] / 1024:.0f} KiB"
                  f"   time {summary.timings.get('total', 0):.1f} s"
                  + (f" on {summary.device}" if summary.device else ""))
    if summary.skipped:
        by_reason: dict[str, list[str]] = {}
        for name, why in summary.skipped.items():   # one line per kind of reason: node names left out
            by_reason.setdefault(re.sub(r" ?'[^']*'", "", why), []).append(name)
        out.print(f"[bold]not pruned[/bold] ({len(summary.skipped)}):")
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            out.print(f"  {why}: {shown}", highlight=False)
    for note in summary.notes:
        out.print(f"note: {note}")
    if dynamic:
        _print_dynamic(dynamic)
    if verbose:
        t = Table(title="plan (dry run)" if dry_run else "compressed layers", show_lines=False)
        for col in ("layer", "op", "channels", "W bits", "A bits", "MACs", "params"):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for r in summary.rows:
            ch = f"{r.channels_before}" if r.channels_after == r.channels_before else f"{r.channels_before}→{r.channels_after}"
            t.add_row(r.name, r.kind, ch, _bits(r.wbits), _bits(r.abits),
                      f"{_fmt_m(r.macs_before)}→{_fmt_m(r.macs_after)}", f"{r.params_before}→{r.params_after}")
        out.print(t)
    else:
        out.print("(--verbose for the per-layer table)", highlight=False)
    if output is not None and not dry_run:
        out.print(f"wrote {output}")


def _print_dynamic(d: dict) -> None:
    """The dynamic model in a few lines: how it chooses, what the probes chose, what it costs."""
    configs = d.get("configs") or []
    if d.get("mode") == "cascade" and configs:
        rerun = d.get("rerun")
        out.print(f"dynamic (cascade): every image at {d['first']}" +
                  (f", rerun at {rerun} when the first pass is unsure "
                   f"({100 * d.get('rerun_fraction', 0):.1f} % of the probe images)" if rerun else ""))
    elif configs:
        out.print(f"dynamic (upfront): the selector picks one of {', '.join(configs)} per image")
    hist = d.get("histogram")
    if hist:
        out.print(f"bits chosen on {d.get('probe_images', sum(hist.values()))} probe images: "
                  + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    if "expected_bits" in d:
        out.print(f"expected average bits {d['expected_bits']:.2f} (target {d.get('target_bits', 0):.2f}), "
                  f"{d.get('expected_bops', 0) / 1e9:.3f} GBOPs per image; agreement with the float model on "
                  f"the probes {100 * d.get('probe_agreement_with_float', 0):.1f} %")
    if "expected_bits_all_probes" in d:
        out.print(f"the target holds on the probes made to be recognised with confidence; on all "
                  f"{d.get('all_probe_images', '?')} probes, the deliberately hard ones included, "
                  f"{d['expected_bits_all_probes']:.2f} bits. Inputs the model is less sure of are rerun more "
                  "often: `datafree run --images` measures real ones, `datafree retarget` re-prices the "
                  "selector on them")
    sel = d.get("selector")
    if sel:
        out.print(f"selector: {sel['params']} parameters, {sel['bops_pct_of_model']:.3f} % of the BOPs")
    if d.get("note"):
        out.print(f"note: {d['note']}")
