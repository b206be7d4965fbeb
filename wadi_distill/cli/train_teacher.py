"""``wadi-distill train-teacher``: train the ``builtin:digits`` teacher and write its files (as shipped)."""

from __future__ import annotations

from pathlib import Path

import typer

from wadi_distill.cli import app
from wadi_probe.console import Device, console, device_option, handle_errors
from wadi_probe.text import plural


@app.command("train-teacher")
@handle_errors
def train_teacher_command(
    output: Path = typer.Option(..., "--output", "-o", help="Folder for digits_unet/text_encoder .safetensors + digits_teacher.json."),
    steps: int = typer.Option(6000, "--steps", help="Optimiser steps."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, batches, noise and the evaluation samples."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training images per step."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate (warm-up, then cosine decay)."),
    device: Device = device_option(Device.cpu),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score DDIM samples against held-out digits with the shipped classifier."),
    eval_steps: int = typer.Option(50, "--eval-steps", help="DDIM steps for the evaluation samples."),
    eval_cfg: float = typer.Option(2.0, "--eval-cfg", help="CFG scale for the evaluation samples."),
) -> None:
    """Train the class-conditional digits teacher (ε-prediction, 10 % null-prompt dropout, EMA weights)."""
    from wadi_distill.digits_demo.teacher_training import TeacherTrainingConfig, train_and_save_teacher

    config = TeacherTrainingConfig(steps=steps, seed=seed, batch_size=batch_size, learning_rate=learning_rate)
    metadata = train_and_save_teacher(output, config, device=device.value, evaluate=evaluate, eval_steps=eval_steps,
                                      eval_cfg=eval_cfg)
    console.print(f"trained {plural(steps, 'step')} in {metadata['wall_seconds']:.0f} s; final loss {metadata['final_loss']}")
    metrics = metadata.get("metrics_at_training_time")
    if metrics is None:
        console.print("evaluation skipped (no shipped digit classifier, or --no-evaluate)")
    else:
        t = metrics["teacher"]
        console.print(f"teacher samples vs held-out digits: FD pixel {t['fd_pixel']:.2f}, FD features "
                      f"{t['fd_features']:.2f}, precision {t['precision']:.3f}, recall {t['recall']:.3f}, "
                      f"class accuracy {t['class_accuracy']:.3f}")
    console.print(f"wrote {output}")
