"""``datafree report`` and ``datafree targets``: parse, call ``datafree.toolchain.report``, print."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import UserError


class _Bar:
    """The report's progress callback drawn as a rich progress bar, one task per stage."""

    def __init__(self, progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1))
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, report.json and the plots.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="The model MODEL was compressed from: report what compression cost.")
@click.option("--target", default="cortex-a55", show_default=True,
              help="Built-in device profile (see `datafree targets`), host (this machine, measured; with "
                   "--measure the estimate is checked against onnxruntime's per-layer profile) or a path to a "
                   ".toml profile.")
@click.option("--bits", default="8,6,4", show_default=True, help="Weight bit-widths to compare.")
@click.option("--abits", default=8, show_default=True, type=click.IntRange(2, 16),
              help="Activation bits of the compared choices.")
@click.option("--images", type=click.Path(dir_okay=False, path_type=Path),
              help="Probe inputs: .npz with 'images' (uint8 NHWC) + 'mean'/'std', or float NCHW 'x'.")
@click.option("--probes", "n_probes", default=16, show_default=True, type=click.IntRange(min=1),
              help="Number of probe inputs.")
@click.option("--synth-steps", default=50, show_default=True, type=int,
              help="Optimisation steps of the synthetic probe images (without --images).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--measure", is_flag=True, help="Also time the model in a plain onnxruntime session on this machine, at "
              "batch 1 and a large batch (as a ratio to --reference's time, measured in the same run).")
@click.option("--bounds", is_flag=True, help="Bounds on the best possible rounding error per channel (SDP).")
@click.option("--bounds-budget", default=60.0, show_default=True, type=float,
              help="Time budget of --bounds in seconds (a layer once started gets at least one channel).")
@click.option("--bounds-max-n", default=64, show_default=True, type=int,
              help="Largest input dimension per output channel given to the SDP (n = 64 takes ~15 s a channel).")
def report(model, out_dir, reference, target, bits, abits, images, n_probes, synth_steps, seed, measure, bounds,
           bounds_budget, bounds_max_n):
    """What compressing MODEL would cost (or, with --reference, what it did cost) on a target device."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import build_report, write_report
    from .report.render import console, prepare_dir, print_summary

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: output folder is an existing file")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        rep = build_report(model, reference=reference, target=target, bits=bits, abits=abits, images=images,
                           n_probes=n_probes, synth_steps=synth_steps, seed=seed, measure=measure, bounds=bounds,
                           bounds_budget=bounds_budget, bounds_max_n=bounds_max_n, progress=_Bar(bar))
        prepare_dir(out_dir)
        written = write_report(rep, out_dir)
    print_summary(rep.doc, console())
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out_dir}")


@click.command()
def targets():
    """List the built-in device profiles."""
    from rich.table import Table

    from .report.render import console
    from .report.targets import builtin_targets

    t = Table(title="built-in targets (use --target NAME, or --target path/to/profile.toml)")
    for h in ("name", "kind", "description", "peak GMAC/s", "GB/s", "on-chip"):
        t.add_column(h)
    for p in builtin_targets():
        peaks = ", ".join(f"{k} {v:g}" for k, v in p.peak_gmacs.items())
        t.add_row(p.name, p.kind, p.description, peaks, f"{p.bandwidth_gb_s:g}", f"{p.onchip_kib:g} KiB")
    t.add_row("host", "cpu", "this machine: rates onnxruntime reaches here, measured on first use and cached",
              "measured", "measured", "largest cache")
    console().print(t)
