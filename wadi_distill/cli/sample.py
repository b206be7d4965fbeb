"""``wadi-distill sample``: one-step images from a distilled student (adapter or merged weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wadi_distill.cli import app
from wadi_probe.console import Device, console, device_option, handle_errors


@app.command("sample")
@handle_errors
def sample_command(
    teacher: str = typer.Option(..., "--teacher", help="The teacher's pipeline folder (or builtin:digits)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Student adapter folder (final/: the weight average; final/last-step/: the raw weights) or adapter.safetensors."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Merged student weights (student.safetensors)."),
    n: int = typer.Option(4, "-n", "--num-images", help="Images per prompt (at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; the others count up."),
    device: Device = device_option(Device.cpu),
    output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="Grid picture to write (.png or .jpg, one line per prompt), or a folder (a path without a suffix) for one PNG per image."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images generated (and held in memory) at a time."),
    max_hours: float = typer.Option(24.0, "--max-hours", help="Refuse a request that would take longer (estimated from the first batch)."),
) -> None:
    """Generate images in ONE denoiser evaluation per image and save them as a grid or one file each.

    Images are written batch by batch; after the first batch a request that would not fit on the disk or would
    take longer than --max-hours is refused before anything is written.
    """
    from wadi_distill.one_step import sample_output_kind, sample_to_files
    from wadi_probe.io.outputs import check_outputs

    kind = sample_output_kind(output)  # refused before the teacher is loaded
    label = "image folder" if kind is None else "image grid"
    check_outputs({label: output}, [teacher, adapter, merged], folders=(label,) if kind is None else ())
    written = sample_to_files(teacher, list(prompt), output, adapter=adapter, merged=merged, n=n, seed=seed,
                              device=device.value, batch_size=batch_size, max_hours=max_hours)
    where = f"the folder {output}" if kind is None else output
    count = written["images"]
    console.print(f"wrote {count} one-step image{'' if count == 1 else 's'} to {where}", highlight=False, soft_wrap=True)
