"""``wadi-probe compare``: probe a teacher/student pair layer by layer, print the summary, save the report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wadi_probe.cli import app
from wadi_probe.console import Device, console, device_option, handle_errors
from wadi_probe.errors import WadiInputError


def _check_output(path: Optional[Path], what: str) -> None:
    if path is not None and path.is_dir():
        raise WadiInputError(f"the {what} path {path} is a folder; give a file name.")


@app.command("compare")
@handle_errors
def compare_command(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint: .safetensors, diffusers folder, LDM single file or torch .bin/.pt/.ckpt."),
    student: Path = typer.Argument(..., help="Student checkpoint (any of the teacher's layouts), or an adapter file with --adapter."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the report (JSON) here."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the per-layer table as CSV here."),
    device: Device = device_option(),
    include: Optional[str] = typer.Option(None, "--include", help="Only tensors whose name matches this regex."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Leave out tensors whose name matches this regex."),
    no_spectra: bool = typer.Option(False, "--no-spectra", help="Skip residual and rotation spectra (much faster)."),
    adapter: bool = typer.Option(False, "--adapter", help="STUDENT is an adapter (LoRA/LoRaD) merged onto TEACHER."),
    explained_at_rank: bool = typer.Option(
        False, "--explained-at-rank", help="Also report how much of the direction change LoRaD at the recommended rank explains (slower)."
    ),
    top: int = typer.Option(10, "--top", help="How many of the most rotated layers to list."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Also write every report figure (PNG and SVG) into this folder."),
) -> None:
    """Compare TEACHER and STUDENT: per-layer norm and direction change, angles, spectra, LoRaD rank advice."""
    _check_output(output, "report")
    _check_output(csv, "CSV")
    if plots is not None and plots.exists() and not plots.is_dir():
        raise WadiInputError(f"the plots path {plots} is a file; give a folder.")
    from wadi_probe.analyze import compare
    from wadi_probe.heap import reuse_freed_memory
    from wadi_probe.report.summary import print_summary

    with reuse_freed_memory():  # a process-wide allocator setting: the command line's choice, not the library's
        report = compare(
            teacher, student, device=device.value, include=include, exclude=exclude, spectra=not no_spectra,
            progress=progress, student_is_adapter=adapter, explained_at_rank=explained_at_rank,
        )
    print_summary(report, console, top=top)
    if output is not None:
        report.save(output)
        console.print(f"report written to {output}", highlight=False)
    if csv is not None:
        report.to_csv(csv)
        console.print(f"layer table written to {csv}", highlight=False)
    if plots is not None:
        from wadi_probe.cli.plot import print_saved
        from wadi_probe.report.plots import save_all_plots

        print_saved(save_all_plots(report, plots), plots)
