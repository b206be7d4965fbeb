"""``wadi-distill export``: the teacher with an adapter merged in, as a plain .safetensors file or diffusers folder."""

from __future__ import annotations

from pathlib import Path

import typer

from wadi_distill.cli import app
from wadi_probe.choices import Choice
from wadi_probe.console import choice_option, console, handle_errors
from wadi_probe.errors import WadiInputError


class ExportFormat(Choice):
    """Key names of the written student: the teacher's own (diffusers) or the original LDM single-file ones."""

    diffusers = "diffusers"
    ldm = "ldm"


@app.command("export")
@handle_errors
def export_command(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model folder, pipeline folder or weights file (or builtin:digits)."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder (wadi-distill) or official theta_a/theta_b checkpoint."),
    output: Path = typer.Option(..., "--output", "-o", help="merged.safetensors, or a folder for a diffusers model folder."),
    format: ExportFormat = choice_option(ExportFormat, ExportFormat.diffusers, "--format", what="format",
                                         help="diffusers (the teacher's key names) or ldm (original single-file names, for ComfyUI/A1111)."),
    into: Path | None = typer.Option(None, "--into", help="With --format ldm: the teacher's original .safetensors checkpoint; write it whole with the student's UNet."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty output folder (never one that holds an input)."),
) -> None:
    """Merge an adapter into the teacher and write the student with the teacher's key names and dtypes."""
    from wadi_distill.transfer import check_transfer
    from wadi_probe.builtins import resolve_builtin

    teacher = Path(resolve_builtin(teacher))
    if into is not None and format is not ExportFormat.ldm:
        raise WadiInputError("--into writes an original single-file checkpoint; use it with --format ldm.")
    from wadi_distill.export import check_export_output

    check_export_output(teacher, adapter, output, into=into, overwrite=overwrite)  # before any work
    for line in check_transfer(teacher, adapter).sentences():
        console.print(line, highlight=False, soft_wrap=True)
    if format is ExportFormat.ldm:
        from wadi_distill.single_file import export_single_file

        single = export_single_file(teacher, adapter, output, into=into)
        where = f"into {single.into} ({single.copied_tensors} other tensors copied unchanged" + (
            f", {single.dropped_ema} EMA tensors left out)" if single.dropped_ema else ")") if single.into else "UNet only"
        console.print(f"merged {single.merged_layers} layers; {single.unet_tensors} UNet tensors under LDM names, dtype "
                      f"{single.dtype}, {where}, {single.bytes / 1e6:.1f} MB -> {single.path}", highlight=False)
        return
    from wadi_distill.export import merge_into_checkpoint

    result = merge_into_checkpoint(teacher, adapter, output, overwrite=overwrite)
    source = "official theta checkpoint" if result.official else f"{result.adapter_kind} adapter"
    console.print(
        f"merged {result.merged_layers} layers ({source}) into {result.tensors} tensors, dtype {result.dtype} -> {result.path}",
        highlight=False,
    )
