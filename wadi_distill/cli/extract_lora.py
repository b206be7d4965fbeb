"""``wadi-distill extract-lora``: a LoRA (diffusers/PEFT or kohya layout) from the weight difference of any student."""

from __future__ import annotations

from pathlib import Path

import typer

from wadi_distill.cli import app
from wadi_probe.choices import Choice
from wadi_probe.console import Device, choice_option, console, device_option, handle_errors


class LoraFormat(Choice):
    """Key layout of the written LoRA."""

    diffusers = "diffusers"
    kohya = "kohya"


class FactorDtype(Choice):
    """Stored dtype of the LoRA factors."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@app.command("extract-lora")
@handle_errors
def extract_lora_command(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint (any layout the probe reads)."),
    student: Path = typer.Option(..., "--student", help="Student: a full model (any layout) or an adapter folder/file on the teacher."),
    output: Path = typer.Option(..., "--output", "-o", help="lora.safetensors (the record goes to lora.json)."),
    rank: int | None = typer.Option(None, "--rank", help="Rank per layer (capped at the layer's full rank, where it is exact)."),
    energy: float | None = typer.Option(None, "--energy", help="Per layer, the smallest rank keeping this share of ΔW's energy (e.g. 0.9)."),
    format: LoraFormat = choice_option(LoraFormat, LoraFormat.diffusers, "--format", what="format",
                                       help="diffusers (PEFT names, load_lora_weights) or kohya (ComfyUI/A1111)."),
    dtype: FactorDtype = choice_option(FactorDtype, FactorDtype.float16, "--dtype", what="dtype",
                                       help="Stored dtype of the factors."),
    device: Device = device_option(Device.cpu, help="Where the SVDs run; auto picks CUDA when available."),
    deltas: bool = typer.Option(True, "--deltas/--no-deltas", help="Write changed biases and norms as exact deltas (kohya .diff/.diff_b: ComfyUI applies them, diffusers' loader refuses them)."),
    top: int = typer.Option(10, "--top", help="Show this many layers with the largest error."),
) -> None:
    """ΔW = student − teacher per layer, truncated SVD at a fixed rank or energy share, written as a LoRA."""
    from wadi_distill.lora_extract import extract_lora, summary_lines
    from wadi_probe.device import resolve_device

    result = extract_lora(teacher, student, output, rank=rank, energy=energy, format=format.value, dtype=dtype.value,
                          device=str(resolve_device(device)), deltas=deltas)
    worst = sorted(result.layers, key=lambda layer: -layer.relative_error)[: max(top, 0)]
    if worst:
        from wadi_probe.report.summary import compact_table

        # the layer name folds; the numbers keep their width, so 80 columns or a pipe lose no column
        table = compact_table(f"largest relative errors ({len(worst)} of {len(result.layers)} layers; all in the record)")
        table.add_column("layer", overflow="fold", ratio=1, min_width=14)
        for header in ("shape", "rank", "of", "error"):
            table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
        for layer in worst:
            table.add_row(layer.module, "×".join(map(str, layer.shape)), str(layer.rank), str(layer.full_rank),
                          f"{layer.relative_error:.4f}")
        console.print(table)
    for line in summary_lines(result):
        console.print(line, highlight=False)
