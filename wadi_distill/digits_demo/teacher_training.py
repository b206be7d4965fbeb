"""Training the ``builtin:digits`` teacher: ε-prediction with null-prompt dropout, so CFG works.

Each step draws a batch of training digits, a timestep t ~ U{0..999}, noise ε, forms
``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`` with the scheduler's SD-like schedule, replaces the prompt with the empty
prompt with probability ``null_prompt_prob`` (10 %, as SD does for classifier-free guidance), and minimises
``mean((ε_θ(x_t, t, c) − ε)²)``. UNet and prompt encoder train together with AdamW, a short warm-up and cosine
decay; an exponential moving average (EMA) of the weights is what gets returned, as is usual for diffusion.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wadi_distill.builtin.digits.data import load_split
from wadi_distill.builtin.digits.model import DigitsModel, build_teacher
from wadi_distill.schedules import add_noise, schedule_from_scheduler
from wadi_probe.device import resolve_device
from wadi_probe.errors import WadiInputError, WadiRuntimeError


@dataclass
class TeacherTrainingConfig:
    """Hyper-parameters of one teacher training run (all of them end up in the shipped JSON)."""

    steps: int = 6000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    null_prompt_prob: float = 0.1
    seed: int = 0
    split_seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise WadiInputError("Training needs at least one step and a batch size of at least one.")
        if not 0.0 <= self.null_prompt_prob <= 1.0:
            raise WadiInputError("null_prompt_prob must lie in [0, 1].")
        if not 0.0 <= self.ema_decay < 1.0:
            raise WadiInputError("ema_decay must lie in [0, 1).")


@dataclass
class TeacherTrainingResult:
    teacher: DigitsModel  # the EMA weights, eval mode
    losses: list[float] = field(default_factory=list)  # mean loss per logging window
    wall_seconds: float = 0.0
    config: dict = field(default_factory=dict)


def noise_images(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`` with ᾱ read from the scheduler (the schedule's forward process)."""
    alpha, sigma = schedule_from_scheduler(scheduler).alpha_sigma(timesteps, clean)
    return add_noise(clean, noise, alpha, sigma).to(clean.dtype)


def _training_data(config: TeacherTrainingConfig, train_images: torch.Tensor | None,
                   train_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels to train on: the given ones, or the fixed ``train`` split; refuses unequal lengths."""
    if train_images is None:
        split = load_split("train", seed=config.split_seed)
        train_images, train_labels = split.images, split.labels
    if train_labels is None or len(train_labels) != len(train_images):
        raise WadiInputError("Give one label per training image.")
    return train_images, train_labels


def _warmup_cosine(optimizer: torch.optim.Optimizer,
                   config: TeacherTrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``steps``."""
    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _sample_batch(teacher: DigitsModel, images_cpu: torch.Tensor, prompts_all: list[str], num_timesteps: int,
                  config: TeacherTrainingConfig, generator: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """One batch (clean images, prompts with null-prompt dropout, noise, timesteps), drawn from ``generator``.

    The draws keep one order (indices, dropout, noise, timesteps) so that a seed always gives the same run.
    """
    idx = torch.randint(0, len(images_cpu), (config.batch_size,), generator=generator)
    clean = images_cpu[idx].to(device)
    prompts = [prompts_all[i] for i in idx.tolist()]
    drop = torch.rand(config.batch_size, generator=generator) < config.null_prompt_prob
    prompts = [teacher.null_prompt if d else p for p, d in zip(prompts, drop.tolist())]
    noise = torch.randn(clean.shape, generator=generator).to(device)
    timesteps = torch.randint(0, num_timesteps, (config.batch_size,), generator=generator).to(device)
    return clean, prompts, noise, timesteps


def _epsilon_loss(teacher: DigitsModel, clean: torch.Tensor, prompts: list[str], noise: torch.Tensor,
                  timesteps: torch.Tensor, step: int) -> torch.Tensor:
    """``mean((ε_θ(x_t, t, c) − ε)²)`` for one batch; a non-finite loss stops training with advice."""
    noisy = noise_images(teacher.scheduler, clean, noise, timesteps)
    embeddings = teacher.encode_prompts(prompts)
    pred = teacher.unet(noisy, timesteps, encoder_hidden_states=embeddings).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    if not torch.isfinite(loss):
        raise WadiRuntimeError(f"The teacher's loss became {loss.item()} at step {step}; lower the learning rate.")
    return loss


def _update(loss: torch.Tensor, params: list[torch.Tensor], ema_params: list[torch.Tensor],
            optimizer: torch.optim.Optimizer, scheduler_lr: Any, ema_decay: float, step: int) -> None:
    """One optimiser step (gradients clipped at norm 1), then the EMA, whose decay ramps up over the first steps."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler_lr.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)


def _train_steps(teacher: DigitsModel, params: list[torch.Tensor], ema_params: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer, scheduler_lr: Any, images_cpu: torch.Tensor, prompts_all: list[str],
                 config: TeacherTrainingConfig, generator: torch.Generator, device: torch.device, *, progress: bool,
                 log_every: int) -> list[float]:
    """Run ``config.steps`` training steps; returns the mean loss of each ``log_every`` window (and the last one)."""
    num_timesteps = teacher.scheduler.config.num_train_timesteps
    losses: list[float] = []
    window: list[float] = []
    bar = None
    if progress:
        from wadi_probe.console import progress_bar

        bar = progress_bar("train teacher", "loss")
        task = bar.add_task("train", total=config.steps, loss="-")
        bar.start()
    try:
        for step in range(config.steps):
            clean, prompts, noise, timesteps = _sample_batch(teacher, images_cpu, prompts_all, num_timesteps, config,
                                                             generator, device)
            loss = _epsilon_loss(teacher, clean, prompts, noise, timesteps, step)
            _update(loss, params, ema_params, optimizer, scheduler_lr, config.ema_decay, step)
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == config.steps:
                losses.append(sum(window) / len(window))
                window = []
                if bar is not None:
                    bar.update(task, loss=f"{losses[-1]:.4f}")
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return losses


def train_teacher(config: TeacherTrainingConfig | None = None, *, teacher: DigitsModel | None = None,
                  device: torch.device | str = "cpu", progress: bool = True, log_every: int = 100,
                  train_images: torch.Tensor | None = None,
                  train_labels: torch.Tensor | None = None) -> TeacherTrainingResult:
    """Train a digits teacher from scratch (or continue ``teacher``) and return its EMA copy.

    The training data default to the fixed ``train`` split; tests may pass tiny ``train_images``/``train_labels``.
    """
    config = config or TeacherTrainingConfig()
    config.validate()
    device = torch.device(device)
    train_images, train_labels = _training_data(config, train_images, train_labels)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if teacher is None:
        teacher = build_teacher(seed=config.seed)
    teacher.to(device)
    teacher.unet.train()
    teacher.text_encoder.train()
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)
    params = list(teacher.unet.parameters()) + list(teacher.text_encoder.parameters())
    ema_params = list(ema.unet.parameters()) + list(ema.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler_lr = _warmup_cosine(optimizer, config)
    prompts_all = teacher.prompts_for_labels(train_labels.tolist())
    images_cpu = train_images.float()

    start = time.perf_counter()
    losses = _train_steps(teacher, params, ema_params, optimizer, scheduler_lr, images_cpu, prompts_all, config,
                          generator, device, progress=progress, log_every=log_every)
    wall = time.perf_counter() - start
    return TeacherTrainingResult(teacher=ema, losses=losses, wall_seconds=wall, config=asdict(config))


def train_and_save_teacher(output: str | Path, config: TeacherTrainingConfig | None = None, *,
                           device: torch.device | str = "cpu", evaluate: bool = True, eval_steps: int = 50,
                           eval_cfg: float = 2.0, progress: bool = True) -> dict[str, Any]:
    """Train a teacher, write its files into ``output`` and, with the shipped classifier, score its samples.

    This is ``wadi-distill train-teacher``. Returns the metadata written to ``digits_teacher.json`` (command,
    seed, wall time, data split, loss history and, when ``evaluate``, the metrics at training time measured on
    the weights exactly as stored).
    """
    from wadi_distill.builtin.digits.classifier import CLASSIFIER_FILE
    from wadi_distill.builtin.digits.data import split_description
    from wadi_distill.builtin.digits.model import (BUILTIN_DIR, TEACHER_CONFIG_FILE, TEXT_ENCODER_FILE, UNET_FILE,
                                                    load_teacher_dir, save_teacher)
    from wadi_probe.io.outputs import check_outputs

    config = config or TeacherTrainingConfig()
    output = Path(output)
    classifier = BUILTIN_DIR / CLASSIFIER_FILE if evaluate else None
    # before training: a folder that cannot be written (or would overwrite the classifier read for the
    # evaluation) is refused now, not after hours of training
    check_outputs({"teacher folder": output, **{f"teacher's {name}": output / name
                                                 for name in (UNET_FILE, TEXT_ENCODER_FILE, TEACHER_CONFIG_FILE)}},
                  [classifier], folders=("teacher folder",))
    device = resolve_device(device)
    device_name = str(device)
    result = train_teacher(config, device=device, progress=progress)
    command = (f"wadi-distill train-teacher -o {output} --steps {config.steps} --seed {config.seed} "
               f"--batch-size {config.batch_size} --lr {config.learning_rate:g} --device {device_name}")
    metadata: dict[str, Any] = {
        "command": command,
        "seed": config.seed,
        "device": device_name,
        "torch_version": torch.__version__,
        "wall_seconds": round(result.wall_seconds, 1),
        "training": result.config,
        "final_loss": round(result.losses[-1], 5) if result.losses else None,
        "loss_history": [round(x, 5) for x in result.losses[:: max(1, len(result.losses) // 30)]],
        "data_split": split_description(config.split_seed),
    }
    # Save first, so the evaluation measures the weights exactly as stored (fp16 round trip).
    save_teacher(result.teacher, output, metadata=metadata)
    if evaluate and (BUILTIN_DIR / CLASSIFIER_FILE).is_file():
        from wadi_distill.digits_demo.sanity import sanity_rows

        stored = load_teacher_dir(output, device=device)
        rows = sanity_rows(stored, steps=eval_steps, cfg=eval_cfg, seed=config.seed, device=device)
        metadata["metrics_at_training_time"] = {
            "settings": {"sampler": "DDIM", "steps": eval_steps, "cfg": eval_cfg, "seed": config.seed,
                         "images": rows[1]["num_images"], "reference": "reference split"},
            "teacher": {k: v for k, v in rows[1].items() if k != "name"},
            "held_out_real": {k: v for k, v in rows[0].items() if k != "name"},
        }
        save_teacher(stored, output, metadata=metadata)
    return metadata
