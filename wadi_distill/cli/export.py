"""``wadi-distill export``: the teacher with an adapter merged in, as a plain .safetensors file or diffusers folder."""

from __future__ import annotations

from pathlib import Path

import typer

from wadi_distill.cli import app
from wadi_probe.console import console, handle_errors


@app.command("export")
@handle_errors
def export_command(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher model folder or pipeline folder."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder (wadi-distill) or official theta_a/theta_b checkpoint."),
    output: Path = typer.Option(..., "--output", "-o", help="merged.safetensors, or a folder for a diffusers model folder."),
) -> None:
    """Merge an adapter into the teacher and write the student with the teacher's key names and dtypes."""
    from wadi_distill.export import merge_into_checkpoint

    result = merge_into_checkpoint(teacher, adapter, output)
    source = "official theta checkpoint" if result.official else f"{result.adapter_kind} adapter"
    console.print(
        f"merged {result.merged_layers} layers ({source}) into {result.tensors} tensors, dtype {result.dtype} -> {result.path}",
        highlight=False,
    )
