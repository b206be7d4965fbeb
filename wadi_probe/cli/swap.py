"""``wadi-probe swap``: write a norm/direction hybrid of a teacher and a student (the paper's Fig. 1(c) ablation)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wadi_probe.cli import app
from wadi_probe.console import console, handle_errors


@app.command("swap")
@handle_errors
def swap_command(
    teacher: str = typer.Argument(..., metavar="TEACHER", help="Teacher checkpoint (file or diffusers folder, or builtin:digits)."),
    student: Path = typer.Argument(..., metavar="STUDENT", help="Student checkpoint; the hybrid is written in its layout, key names and dtypes."),
    take: str = typer.Option(..., "--take", help="What to take from the teacher: 'norm' (per-row norms) or 'direction' (per-row directions)."),
    output: Path = typer.Option(..., "--output", "-o", help="Hybrid file to write (.safetensors, or .bin/.pt)."),
    include: Optional[str] = typer.Option(None, help="Only swap tensors whose name matches this regex."),
    exclude: Optional[str] = typer.Option(None, help="Do not swap tensors whose name matches this regex."),
) -> None:
    """Write the student with the teacher's per-row norms (--take norm) or directions (--take direction)."""
    from wadi_probe.hybrid import write_hybrid

    result = write_hybrid(teacher, student, take, output, include=include, exclude=exclude)
    other = "direction" if take == "norm" else "norm"
    console.print(
        f"wrote {result.path}: {len(result.swapped)} tensors with the teacher's per-row {take} and the student's "
        f"{other}; {len(result.kept)} kept as the student's"
        + (f"; {result.kept_rows} zero or non-finite rows left unchanged" if result.kept_rows else ""),
        highlight=False,
    )
