"""``wadi-probe show``: print the summary of a saved report again."""

from __future__ import annotations

from pathlib import Path

import typer

from wadi_probe.cli import app
from wadi_probe.console import console, handle_errors


@app.command("show")
@handle_errors
def show_command(
    report: Path = typer.Argument(..., metavar="REPORT", help="A report.json written by `wadi-probe compare -o`."),
    top: int = typer.Option(10, "--top", help="How many of the most rotated layers to list."),
) -> None:
    """Print the summary of a saved report: headline, most rotated layers, block × layer-type table."""
    import sys

    from wadi_probe.report.schema import load_report
    from wadi_probe.report.summary import print_summary

    loaded = load_report(report)
    try:
        print_summary(loaded, console, top=top)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (``| head``): nothing is lost, stop quietly
        from wadi_probe.cli.compare import _quiet_broken_pipe

        _quiet_broken_pipe()
