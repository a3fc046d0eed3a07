"""``datafree report``: what a compression choice costs, before or after compressing.

    from datafree.toolchain.report import build_report, write_report
    rep = build_report("small.onnx", reference="model.onnx", target="cortex-a55")
    write_report(rep, "report/")
"""

from .build import SCHEMA, Report, build_report, parse_bits


def write_report(report: Report, out_dir, **kwargs):
    """Write report.md, report.json and the plots into ``out_dir``; returns the paths."""
    from .render import write_report as _write

    return _write(report, out_dir, **kwargs)


__all__ = ["SCHEMA", "Report", "build_report", "parse_bits", "write_report"]
