"""``wadi-probe plot``: draw every figure of a report.json (and optionally one layer's pair-angle heatmap)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wadi_probe.cli import app
from wadi_probe.console import console, handle_errors
from wadi_probe.errors import WadiInputError


def print_saved(saved, out_dir: Path) -> None:
    """Print what :func:`wadi_probe.report.plots.save_all_plots` wrote and skipped (shared with ``compare --plots``)."""
    stems = list(dict.fromkeys(p.stem for p in saved.files))
    suffixes = "/".join(dict.fromkeys(p.suffix.lstrip(".") for p in saved.files))
    console.print(f"wrote {len(saved.files)} files to {out_dir} ({suffixes}): {', '.join(stems)}", highlight=False)
    for name, why in saved.skipped:
        console.print(f"skipped {name}: {why}", highlight=False)


@app.command("plot")
@handle_errors
def plot_command(
    report: Path = typer.Argument(..., help="report.json written by `wadi-probe compare`."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the figures (created if missing)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Also draw this layer's pair-angle heatmap (needs --teacher and --student)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher checkpoint, for the --layer heatmap."),
    student: Optional[Path] = typer.Option(None, "--student", help="Student checkpoint, for the --layer heatmap."),
    formats: List[str] = typer.Option(["png", "svg"], "--format", "-f", help="Image format(s): png, svg, pdf (repeatable)."),
) -> None:
    """Write the norm/direction, depth-profile, spectrum and rank figures of a report as PNG and SVG."""
    from wadi_probe.report.plots import save_all_plots
    from wadi_probe.report.schema import load_report

    loaded = load_report(report)
    if layer is not None and (teacher is None or student is None):
        raise WadiInputError("--layer needs --teacher and --student to draw the pair-angle heatmap.")
    if layer is None and (teacher is not None or student is not None):
        raise WadiInputError("--teacher and --student are only used with --layer NAME.")
    saved = save_all_plots(loaded, output, formats, layer=layer, teacher=teacher, student=student)
    print_saved(saved, output)
