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
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Student adapter folder (final/, or final/ema/ for the EMA) or adapter.safetensors."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Merged student weights (student.safetensors)."),
    n: int = typer.Option(4, "-n", "--num-images", help="Images per prompt (at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; the others count up."),
    device: Device = device_option(Device.cpu),
    output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="PNG grid to write."),
) -> None:
    """Generate images in ONE denoiser evaluation per image and save them as a grid."""
    from wadi_distill.one_step import sample, save_image_grid
    from wadi_probe.io.outputs import check_outputs

    check_outputs({"image grid": output}, [teacher, adapter, merged])  # refused before the teacher is loaded
    images = sample(teacher, list(prompt), adapter=adapter, merged=merged, n=n, seed=seed, device=device.value)
    save_image_grid(images, output, nrow=n)
    console.print(f"wrote {images.shape[0]} one-step images to {output}", highlight=False, soft_wrap=True)
