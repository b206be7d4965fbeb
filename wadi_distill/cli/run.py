"""``wadi-distill run``: distil a teacher into a one-step student with VSD and LoRaD (or LoRA / full weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from wadi_distill.cli import app
from wadi_distill.cli.plan import Preset
from wadi_distill.vsd.config import EMA_MAX_DECAY, EMA_POWER, FakeKind, MixedPrecision
from wadi_probe.choices import Choice
from wadi_probe.console import (Device, choice_option, console, device_option, err_console, handle_errors,
                                stdout_may_close)
from wadi_probe.errors import WadiInputError
from wadi_probe.text import plural


class StudentAdapter(Choice):
    """Adapter kinds of an adapter student (``--full-finetune`` trains every weight instead)."""

    lorad = "lorad"
    lora = "lora"


@app.command("run")
@handle_errors
def run_command(
    teacher: str = typer.Option(..., "--teacher", help="Local diffusers pipeline folder, or builtin:digits."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for checkpoints, logs and final/."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file: .txt (one per line), .jsonl or .csv."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Column/field holding the prompt (.csv/.jsonl)."),
    preset: Preset = choice_option(Preset, Preset.paper, "--preset", what="preset", help="Layer preset for --rank."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Uniform LoRaD rank of the student on the preset's layers."),
    rank_from_probe: Optional[Path] = typer.Option(None, "--rank-from-probe", help="wadi-probe report.json choosing layers and ranks."),
    budget: float = typer.Option(0.10, "--budget", help="Trainable fraction of the backbone for --rank-from-probe."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A plan.json from `wadi-distill plan`."),
    full_finetune: bool = typer.Option(False, "--full-finetune", help="Train every weight of the student (no adapter)."),
    student_adapter: StudentAdapter = choice_option(StudentAdapter, StudentAdapter.lorad, "--student-adapter",
                                                    what="student adapter", help="Student adapter kind."),
    fake_adapter: FakeKind = choice_option(FakeKind, FakeKind.lorad, "--fake-adapter", what="fake adapter",
                                           help="Fake-score adapter kind."),
    fake_rank: int = typer.Option(32, "--fake-rank", help="Rank of the fake score's adapter."),
    max_steps: int = typer.Option(1000, "--max-steps", help="Training steps (student updates)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Prompts per process and step."),
    lr: float = typer.Option(1e-4, "--lr", help="Student learning rate (AdamW)."),
    fake_lr: float = typer.Option(1e-2, "--fake-lr", help="Fake-score learning rate (AdamW)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale, the same for real and fake scores (default 1.5; 1 for Flux.1)."),
    fake_cfg: Optional[float] = typer.Option(
        None, "--fake-cfg", help="The fake score's own guidance scale (default: --cfg's, as in the paper; 1: the "
        "fake score unguided, as in DMD2 and SwiftBrush)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "--teacher-guidance", help="The real score's embedded guidance, for guidance-distilled teachers (FLUX.1-dev; default 3.5)."),
    fake_updates: int = typer.Option(1, "--fake-updates-per-step", help="Fake-score updates per student update."),
    dmd_normalization: bool = typer.Option(
        False, "--dmd-normalization", help="DMD's update: (x0_fake - x0_real) divided per sample by "
        "mean|x0 - x0_real|, in place of the schedule's weight (1 - alpha_bar_t)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm."),
    lr_warmup_steps: int = typer.Option(0, "--lr-warmup-steps", help="Linear learning-rate warm-up from 0."),
    adam_weight_decay: float = typer.Option(0.0, "--adam-weight-decay", help="AdamW weight decay of both optimizers."),
    ema_decay: Optional[float] = typer.Option(
        None, "--ema-decay", help=f"Largest decay of the student's weight average, which final/ holds (default {EMA_MAX_DECAY:g})."),
    ema_power: Optional[float] = typer.Option(
        None, "--ema-power", help=f"Ramp of the average's decay: min(ema-decay, 1 - (1 + step)^-power) (default {EMA_POWER:.4g})."),
    no_ema: bool = typer.Option(False, "--no-ema", help="No weight average: final/ holds the last step's raw weights."),
    checkpointing_steps: int = typer.Option(500, "--checkpointing-steps", help="Write checkpoint-STEP every K steps."),
    checkpoints_total_limit: Optional[int] = typer.Option(None, "--checkpoints-total-limit", help="Keep only the newest M checkpoints."),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint folder to continue from."),
    validation_steps: int = typer.Option(0, "--validation-steps", help="Write a validation grid every N steps (0: only at the end)."),
    validation_prompt: Optional[list[str]] = typer.Option(None, "--validation-prompt", help="Fixed validation prompt (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed of all sampling in the run."),
    device: Device = device_option(help="auto picks CUDA when available (multi-GPU: launch with accelerate/torchrun)."),
    mixed_precision: Optional[MixedPrecision] = choice_option(
        MixedPrecision, None, "--mixed-precision", what="mixed precision",
        help="Default: what `accelerate launch` or its config says, else no."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    sequential_cfg: bool = typer.Option(
        False, "--sequential-cfg", help="Run the guided passes' conditional and null-prompt halves one after the "
        "other, not as one doubled batch: a lower peak memory, more kernel calls."),
    use_8bit_adam: bool = typer.Option(False, "--use-8bit-adam", help="8-bit AdamW (needs bitsandbytes)."),
    no_tensorboard: bool = typer.Option(False, "--no-tensorboard", help="Do not write TensorBoard logs."),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress", help="A progress bar, or plain log lines (default: a bar on a terminal)."),
    log_every: int = typer.Option(10, "--log-every", help="Steps between plain log lines."),
    checkpoint_signal: Optional[list[str]] = typer.Option(
        None, "--checkpoint-signal", help="Signal that makes the run finish its step, write a checkpoint and exit "
        "with code 75 for a requeue (repeatable; default SIGTERM and SIGUSR1). Ctrl-C does the same, exit code 130."),
) -> None:
    """Train a one-step student by Variational Score Distillation; adapters only, resumable.

    One run per output folder (OUT/run.lock). SIGTERM, SIGUSR1 and Ctrl-C stop it after the current step with a
    checkpoint; --resume latest continues it bit for bit.
    """
    from wadi_distill.vsd.preemption import DEFAULT_SIGNALS, RunStopped
    from wadi_distill.vsd.trainer import DistillConfig, distill

    if full_finetune and student_adapter != StudentAdapter.lorad:
        raise WadiInputError("--full-finetune and --student-adapter cannot be combined.")
    if no_ema and (ema_decay is not None or ema_power is not None):
        raise WadiInputError("--no-ema and --ema-decay / --ema-power cannot be combined.")
    config = DistillConfig(
        teacher=teacher, output_dir=str(output_dir), prompts=str(prompts) if prompts else None,
        prompt_column=prompt_column, student_adapter="full" if full_finetune else student_adapter.value,
        preset=preset.value, rank=rank, rank_from_probe=str(rank_from_probe) if rank_from_probe else None,
        budget=budget, plan=str(plan) if plan else None, fake_adapter=fake_adapter.value, fake_rank=fake_rank,
        max_steps=max_steps, batch_size=batch_size, lr=lr, fake_lr=fake_lr, cfg=cfg, fake_cfg=fake_cfg,
        teacher_guidance=guidance,
        fake_updates_per_step=fake_updates, dmd_normalization=dmd_normalization,
        max_grad_norm=max_grad_norm, lr_warmup_steps=lr_warmup_steps,
        adam_weight_decay=adam_weight_decay,
        ema_decay=None if no_ema else (EMA_MAX_DECAY if ema_decay is None else ema_decay),
        ema_power=EMA_POWER if ema_power is None else ema_power,
        checkpointing_steps=checkpointing_steps, checkpoints_total_limit=checkpoints_total_limit, resume=resume,
        validation_steps=validation_steps, validation_prompts=list(validation_prompt) if validation_prompt else None,
        seed=seed, device=device.value, mixed_precision=mixed_precision.value if mixed_precision else None,
        gradient_checkpointing=gradient_checkpointing, sequential_cfg=sequential_cfg, use_8bit_adam=use_8bit_adam, tensorboard=not no_tensorboard,
        progress=progress, log_every=log_every,
        checkpoint_signals=list(checkpoint_signal) if checkpoint_signal else list(DEFAULT_SIGNALS),
    )
    try:
        result = distill(config)
    except RunStopped as stopped:  # the code tells a scheduler to requeue; a stopped loop said so in one line
        if stopped.step is None:
            err_console.print(stopped.message(), highlight=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None
    with stdout_may_close():  # `run ... | head -1`: the run is done, the summary may go nowhere
        _summary(result)


def _summary(result: Any) -> None:
    """The finished run's outputs, one line each."""
    if result.final_dir is not None:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items() if k.startswith("loss"))
        console.print(f"trained {plural(result.steps, 'step')} (last step: {losses})", highlight=False, soft_wrap=True)
        weights = "weight average" if result.last_step_dir is not None else "last step's weights"
        if result.adapter_path is not None:
            console.print(f"adapter ({weights}): {result.adapter_path}", highlight=False, soft_wrap=True)
        console.print(f"merged student ({weights}): {result.merged_path}", highlight=False, soft_wrap=True)
        if result.last_step_dir is not None:
            console.print(f"last step's raw weights: {result.last_step_dir} (adapter and merged weights)",
                          highlight=False, soft_wrap=True)
        console.print(f"samples: {result.samples_path}", highlight=False, soft_wrap=True)
