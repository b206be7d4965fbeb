"""``wadi-probe plot``: draw every figure of a report.json, or several students' reports side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wadi_probe.cli import app
from wadi_probe.console import console, handle_errors
from wadi_probe.errors import WadiInputError


def print_saved(saved, out_dir: Path) -> None:
    """Print what :func:`wadi_probe.report.plots.save_all_plots` wrote and skipped (shared with ``compare --plots``)."""
    from wadi_probe.cli.compare import saved_lines

    for line in saved_lines(saved, out_dir):
        console.print(line, highlight=False, soft_wrap=True)


@app.command("plot")
@handle_errors
def plot_command(
    reports: List[Path] = typer.Argument(..., metavar="REPORT", help="report.json written by `wadi-probe compare` (several: side by side)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the figures (created if missing)."),
    labels: Optional[List[str]] = typer.Option(None, "--label", help="A name per report (repeat; default: file names)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Also draw this layer's pair-angle heatmap (needs --teacher and --student)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint (or builtin:digits), for the --layer heatmap."),
    student: Optional[str] = typer.Option(None, "--student", help="Student checkpoint, for the --layer heatmap."),
    formats: List[str] = typer.Option(["png", "svg"], "--format", "-f", help="Image format(s): png, svg, pdf (repeatable)."),
    log: Optional[bool] = typer.Option(None, "--log/--linear", help="Log or linear value axes (default: log when values span more than two decades)."),
) -> None:
    """Write the norm/direction, depth-profile, spectrum and rank figures of a report as PNG and SVG; with several
    reports, the side-by-side figures (one colour per student)."""
    from wadi_probe.builtins import resolve_builtin
    from wadi_probe.io.outputs import check_outputs
    from wadi_probe.report.plots import save_all_plots, save_comparison_plots
    from wadi_probe.report.schema import load_report

    if layer is not None and (teacher is None or student is None):
        raise WadiInputError("--layer needs --teacher and --student to draw the pair-angle heatmap.")
    if layer is None and (teacher is not None or student is not None):
        raise WadiInputError("--teacher and --student are only used with --layer NAME.")
    if len(reports) > 1 and layer is not None:
        raise WadiInputError("--layer draws one pair's heatmap; give a single report with it.")
    check_outputs({"plots folder": output}, [*reports, *(p for p in (teacher, student) if p)], folders=("plots folder",))
    loaded = [load_report(path) for path in reports]
    if len(loaded) > 1:
        names = list(labels) if labels else [path.stem for path in reports]
        saved = save_comparison_plots(loaded, names, output, formats)
    else:
        if labels:
            raise WadiInputError("--label names the reports of a side-by-side plot; give two or more reports.")
        saved = save_all_plots(loaded[0], output, formats, layer=layer,
                               teacher=resolve_builtin(teacher) if teacher else None,
                               student=resolve_builtin(student) if student else None, log=log)
    print_saved(saved, output)
