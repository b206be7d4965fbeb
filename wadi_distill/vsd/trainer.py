"""The VSD training loop: a one-step student and a fake score on one shared, frozen teacher base.

Roles on the same denoiser (LoRaD wrappers hold named adapters over frozen base weights):

- teacher ("real" score): no adapter active;
- student G: adapter ``"student"`` (LoRaD from a plan, or LoRA), or — ``student_adapter="full"`` — a separate
  trainable copy of the base weights;
- fake score: adapter ``"fake"`` (LoRaD rank 32 by default, or LoRA).

Accelerate provides the device, mixed precision and the process group; gradients of the adapters are averaged
over processes explicitly (they are the only trainable tensors), so every rank keeps identical adapters.
All randomness comes from one CPU ``torch.Generator`` that every rank advances identically (each takes its
slice of the global batch), which is what makes checkpoints resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wadi_distill.vsd import losses as vsd
from wadi_distill.teachers.pipeline import Conditioning, Teacher, load_teacher
from wadi_distill.teachers.embedding_cache import EmbeddingCache, build_embedding_cache, cache_key
from wadi_distill.lorad.model import inject_lorad, lorad_layers, lorad_parameters, remove_lorad, use_adapter
from wadi_distill.one_step import one_step_images, save_image_grid
from wadi_distill.teachers.prompts import load_prompts
from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.errors import WadiInputError, WadiRuntimeError
from wadi_probe.io.jsonfile import read_json

STUDENT_KINDS = ("lorad", "lora", "full")
FAKE_KINDS = ("lorad", "lora")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class DistillConfig:
    """Everything a VSD run needs; the CLI ``wadi-distill run`` fills one of these."""

    teacher: str
    output_dir: str
    prompts: str | None = None
    prompt_column: str | None = None
    # student
    student_adapter: str = "lorad"  # lorad | lora | full
    preset: str = "paper"
    rank: int | None = None
    rank_from_probe: str | None = None
    budget: float = 0.10
    plan: str | None = None
    # fake score
    fake_adapter: str = "lorad"  # lorad | lora
    fake_rank: int = 32
    # optimisation
    max_steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    fake_lr: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    fake_updates_per_step: int = 1
    cfg: float = 1.5
    use_8bit_adam: bool = False
    ema_decay: float | None = None
    # runtime
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # checkpoints and logs
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    validation_steps: int = 0
    validation_prompts: list[str] | None = None
    num_validation_images: int = 4
    tensorboard: bool = True
    progress: bool = True
    final_samples: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillResult:
    """What a finished run left behind (paths are None on ranks other than 0)."""

    output_dir: Path
    steps: int
    losses: dict[str, float]
    final_dir: Path | None
    adapter_path: Path | None
    merged_path: Path | None
    samples_path: Path | None
    student_state: dict[str, torch.Tensor]
    fake_state: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers


def _validate(config: DistillConfig) -> None:
    if config.student_adapter not in STUDENT_KINDS:
        raise WadiInputError(f"student_adapter must be one of {', '.join(STUDENT_KINDS)}, not {config.student_adapter!r}.")
    if config.fake_adapter not in FAKE_KINDS:
        raise WadiInputError(f"fake_adapter must be one of {', '.join(FAKE_KINDS)}, not {config.fake_adapter!r}.")
    if config.student_adapter != "full":
        given = [config.rank is not None, config.rank_from_probe is not None, config.plan is not None]
        if sum(given) != 1:
            raise WadiInputError("Choose the student's layers and ranks with exactly one of --rank (with --preset), "
                                 "--rank-from-probe or --plan (or train the full student with --full-finetune).")
    elif any([config.rank is not None, config.rank_from_probe, config.plan]):
        raise WadiInputError("--full-finetune trains every weight; it cannot be combined with --rank, "
                             "--rank-from-probe or --plan.")
    for name in ("max_steps", "batch_size", "fake_updates_per_step", "fake_rank"):
        if int(getattr(config, name)) < 1:
            raise WadiInputError(f"{name.replace('_', '-')} must be at least 1.")
    if config.checkpointing_steps < 1:
        raise WadiInputError("checkpointing-steps must be at least 1.")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise WadiInputError("checkpoints-total-limit must be at least 1.")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise WadiInputError(f"mixed precision must be no, fp16 or bf16, not {config.mixed_precision!r}.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise WadiInputError(f"device must be auto, cpu or cuda, not {config.device!r}.")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise WadiInputError("--device cuda was asked for but no CUDA GPU is available.")
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.mixed_precision == "fp16" and on_cpu:
        raise WadiInputError("fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 (or no) on a CPU.")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        raise WadiInputError("ema-decay must be between 0 and 1.")
    if config.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise WadiInputError("--use-8bit-adam needs the bitsandbytes package, which is not installed.") from exc


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint-STEP`` folder in ``output_dir``, oldest first."""
    root = Path(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _default_prompts(teacher: Teacher) -> list[str]:
    builtin = teacher.extra.get("builtin")
    if builtin is not None and hasattr(builtin, "class_prompts"):
        return list(builtin.class_prompts)
    raise WadiInputError("A prompt file (--prompts) is needed for this teacher.")


def _make_plan(config: DistillConfig, model: nn.Module):
    from wadi_distill.plan import Plan, plan_from_preset, plan_from_report

    if config.plan is not None:
        plan = Plan.load(config.plan)
    elif config.rank_from_probe is not None:
        from wadi_probe.report.schema import load_report

        plan = plan_from_report(model, load_report(config.rank_from_probe), budget=config.budget)
    else:
        plan = plan_from_preset(model, int(config.rank), config.preset)
    check_plan_fits(plan, model)
    return plan


def check_plan_fits(plan: Any, model: nn.Module) -> None:
    """Refuse a plan whose layers are missing from ``model`` or have other weight shapes."""
    modules = dict(model.named_modules())
    for entry in plan.layers:
        module = modules.get(entry.module)
        if module is None:
            raise WadiInputError(f"The plan names layer {entry.module}, which this teacher does not have; "
                                 "was the plan made for another model?")
        weight = getattr(module, "weight", None)
        if weight is None and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
        if entry.shape and weight is not None and tuple(weight.shape) != tuple(entry.shape):
            raise WadiInputError(f"The plan expects layer {entry.module} with shape {tuple(entry.shape)} but this "
                                 f"teacher's is {tuple(weight.shape)}; was the plan made for another model?")


def _named(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    ids = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _state(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def _load_state(named: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor], what: str, where: Path) -> None:
    names = {n for n, _ in named}
    if set(tensors) != names:
        raise WadiInputError(f"The {what} in {where} does not match this run's layers; it was written by another run.")
    with torch.no_grad():
        for n, p in named:
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise WadiInputError(f"The {what} in {where} has other shapes than this run; it was written by another run.")
            p.copy_(tensors[n].to(p.device, p.dtype))


def _sync_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` over all processes (the DDP all-reduce, for adapters only)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


def _optimizer(params: list[nn.Parameter], lr: float, config: DistillConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def _warmup(steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)

    return factor


class _Logger:
    """JSONL loss log plus TensorBoard scalars/images; only created on rank 0."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.log_path = output_dir / "logs" / "losses.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():  # drop lines a killed run wrote after its last checkpoint
            kept = [line for line in self.log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "logs" / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard missing or broken: the JSONL log still records everything
                self.writer = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def images(self, step: int, tag: str, grid_path: Path) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        array = np.asarray(Image.open(grid_path).convert("RGB"))
        self.writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _reset_single_process_state() -> None:
    """Let one Python process (a notebook) run several trainings with other precisions or devices.

    Accelerate keeps a process-wide state that refuses a second ``Accelerator`` with another mixed precision;
    outside a multi-process launch it is safe to forget it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------------------------------ the run


class VSDTrainer:
    """Holds the models, optimizers and RNG of one run; :meth:`train` runs it. Use :func:`distill` normally."""

    def __init__(self, config: DistillConfig, teacher: Teacher | None = None) -> None:
        from accelerate import Accelerator

        _validate(config)
        self.config = config
        self.output_dir = Path(config.output_dir)
        if not config.resume and list_checkpoints(self.output_dir):
            raise WadiInputError(f"{self.output_dir} already holds checkpoints; pass --resume latest to continue "
                                 "that run, or choose another output folder.")
        if config.resume and config.resume != "latest" and not (Path(config.resume) / "state.json").is_file():
            raise WadiInputError(f"{config.resume} is not a wadi-distill checkpoint folder (no state.json).")
        cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        _reset_single_process_state()
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

        half_text = None if cpu or self.weight_dtype == torch.float32 else self.weight_dtype
        self.teacher = teacher if teacher is not None else load_teacher(config.teacher, text_encoder_dtype=half_text)
        self.schedule = self.teacher.schedule
        self._prepare_models()  # first: a plan that does not fit is refused before anything is written
        self._prepare_conditioning()
        self.run_id = _hash({
            "teacher": self.teacher.fingerprint, "weights": self.teacher_digest, "student": config.student_adapter,
            "plan": self.plan.ranks() if self.plan is not None else None, "fake": self.fake_plan.ranks(),
            "fake_kind": config.fake_adapter, "prompts": self.prompt_key, "batch": config.batch_size,
        })
        self._prepare_optimizers()
        self.step = 0
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.losses: dict[str, float] = {}

    # ---------------------------------------------------------------- set-up
    def _prepare_conditioning(self) -> None:
        config, teacher = self.config, self.teacher
        prompts = load_prompts(config.prompts, column=config.prompt_column) if config.prompts else _default_prompts(teacher)
        self.prompt_key = cache_key(prompts, teacher.fingerprint, teacher.null_prompt)
        folder = self.output_dir / "embedding-cache" / self.prompt_key  # never overwrites another run's cache
        if self.is_main:
            if teacher.encode_prompts is None:
                raise WadiInputError("The teacher has no text encoder to encode the prompts with.")
            text = teacher.extra.get("text_encoders")
            if text is not None:
                text.to(self.device)
            build_embedding_cache(folder, prompts, teacher.encode_prompts, key=self.prompt_key,
                                  null_prompt=teacher.null_prompt)
        self.accelerator.wait_for_everyone()
        self.cache = EmbeddingCache(folder)
        if self.cache.key != self.prompt_key:
            raise WadiInputError(f"The embedding cache in {folder} belongs to other prompts or another teacher.")
        val_prompts = config.validation_prompts or prompts[: config.num_validation_images]
        self.validation_prompts = list(val_prompts)
        self.validation_cond = (teacher.encode_prompts(self.validation_prompts)
                                if config.validation_prompts else self.cache.get(range(len(self.validation_prompts))))
        teacher.free_text_encoders()
        teacher.extra.pop("text_encoders", None)
        gc.collect()

    def _prepare_models(self) -> None:
        config = self.config
        base = self.teacher.denoiser
        base.requires_grad_(False)
        base.eval()
        self.teacher_digest = self.teacher.weights_digest()  # before any cast: the run's identity
        init_gen = torch.Generator().manual_seed(int(config.seed) + 7919)
        self.full_student: nn.Module | None = None
        if config.student_adapter == "full":
            self.plan = None
            # .float() rather than .to(dtype): diffusers' ModelMixin.to warns about fp32-kept modules on every dtype
            # cast, even when there are none.
            self.full_student = copy.deepcopy(base).to(self.device).float()
            self.full_student.requires_grad_(True)
            self.full_student.train()
        else:
            self.plan = _make_plan(config, base)
            inject_lorad(base, self.plan, adapter_name="student", kind=config.student_adapter,
                         generator=init_gen, activate=False)
        from wadi_distill.plan import plan_from_preset

        self.fake_plan = plan_from_preset(base, int(config.fake_rank), "paper")
        inject_lorad(base, self.fake_plan, adapter_name="fake", kind=config.fake_adapter, generator=init_gen,
                     activate=False)
        base.to(self.device)
        # the frozen base in the compute dtype; adapters stay fp32
        for name, p in base.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(self.weight_dtype)
        self.base = base
        self._layers = list(lorad_layers(base).values())
        if config.student_adapter == "full":
            self.student_named = list(self.full_student.named_parameters())
        else:
            self.student_named = _named(base, lorad_parameters(base, "student"))
        self.fake_named = _named(base, lorad_parameters(base, "fake"))
        for _, p in self.student_named + self.fake_named:
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            for m in (base, self.full_student):
                if m is not None and hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
        self.ema: list[torch.Tensor] | None = None
        if config.ema_decay is not None:
            self.ema = [p.detach().float().clone() for _, p in self.student_named]

    def _prepare_optimizers(self) -> None:
        config = self.config
        self.student_params = [p for _, p in self.student_named]
        self.fake_params = [p for _, p in self.fake_named]
        opt_s = _optimizer(self.student_params, config.lr, config)
        opt_f = _optimizer(self.fake_params, config.fake_lr, config)
        self.opt_student, self.opt_fake = self.accelerator.prepare(opt_s, opt_f)
        self.sched_student = torch.optim.lr_scheduler.LambdaLR(opt_s, _warmup(config.lr_warmup_steps))
        self.sched_fake = torch.optim.lr_scheduler.LambdaLR(opt_f, _warmup(config.lr_warmup_steps))

    # ---------------------------------------------------------------- model roles
    @contextlib.contextmanager
    def _active(self, name: str | None) -> Iterator[None]:
        """Like :func:`wadi_distill.lorad.layer.use_adapter`, over a layer list gathered once (no module walk per call)."""
        saved = [layer.active_adapter for layer in self._layers]
        for layer in self._layers:
            layer.active_adapter = name if name is not None and name in layer.specs else None
        try:
            yield
        finally:
            for layer, previous in zip(self._layers, saved):
                layer.active_adapter = previous

    def predict(self, role: str, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw prediction of ``role`` in {"teacher", "student", "fake"} (fp32)."""
        with self.accelerator.autocast():
            if role == "student" and self.full_student is not None:
                out = self.teacher.call(self.full_student, x, t, cond)
            else:
                with self._active(None if role == "teacher" else role):
                    out = self.teacher.call(self.base, x, t, cond)
        return out.float()

    def _eps(self, role: str, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, alpha, sigma) -> torch.Tensor:
        return vsd.to_epsilon(self.predict(role, x_t, t, cond), x_t, alpha, sigma, self.schedule.prediction_type)

    def _guided_eps(self, role: str, x_t, t, cond: Conditioning, alpha, sigma) -> torch.Tensor:
        """ε with classifier-free guidance at the run's CFG scale (cond and null in one batch)."""
        b = x_t.shape[0]
        if self.config.cfg == 1.0:
            return self._eps(role, x_t, t, cond, alpha, sigma)
        null = self.cache.null.to(self.device).expand(b)
        both = self._eps(role, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, null]),
                         torch.cat([alpha, alpha]), torch.cat([sigma, sigma]))
        return vsd.classifier_free_guidance(both[:b], both[b:], self.config.cfg)

    # ---------------------------------------------------------------- randomness (global batch, sliced)
    def _draw_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        b = self.config.batch_size
        full = torch.randn((b * self.world, *shape), generator=self.generator)
        return full[self.rank * b: (self.rank + 1) * b].to(self.device)

    def _draw_ints(self, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        b = self.config.batch_size
        return fn(b * self.world)[self.rank * b: (self.rank + 1) * b]

    def _draw_batch(self) -> tuple[torch.Tensor, Conditioning]:
        idx = self._draw_ints(lambda n: torch.randint(0, len(self.cache), (n,), generator=self.generator))
        cond = self.cache.get(idx).to(self.device)
        z = self._draw_noise(self.teacher.latent_shape)
        return z, cond

    # ---------------------------------------------------------------- one training step
    def _apply(self, loss: torch.Tensor, params: list[nn.Parameter], optimizer, scheduler, role: str) -> float:
        if not torch.isfinite(loss).all():
            last = list_checkpoints(self.output_dir)
            where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
            raise WadiRuntimeError(f"The {role} loss became {loss.item()} at step {self.step + 1}; training stopped "
                                   f"and {where}.")
        if self.full_student is None:
            # with gradient checkpointing the backward pass re-runs forwards: keep the right adapter active
            with self._active(role):
                self.accelerator.backward(loss)
        else:
            self.accelerator.backward(loss)
        _sync_gradients(params, self.world)
        self.accelerator.unscale_gradients(optimizer=optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train_step(self) -> dict[str, float]:
        """One student update followed by ``fake_updates_per_step`` fake-score updates."""
        schedule = self.schedule
        z, cond = self._draw_batch()
        last = torch.full((z.shape[0],), schedule.last_timestep, device=self.device, dtype=torch.long)
        x0 = vsd.one_step_x0(self.predict("student", z, last, cond), z, schedule)

        # student: VSD gradient from the teacher and the fake score, both with the same CFG scale
        t = self._draw_ints(lambda n: vsd.student_timesteps(n, schedule, self.generator)).to(self.device)
        eps = self._draw_noise(self.teacher.latent_shape)
        alpha, sigma = schedule.alpha_sigma(t, x0)
        with torch.no_grad():
            x_t = vsd.add_noise(x0.detach(), eps, alpha, sigma)
            eps_real = self._guided_eps("teacher", x_t, t, cond, alpha, sigma)
            eps_fake = self._guided_eps("fake", x_t, t, cond, alpha, sigma)
            grad = vsd.vsd_gradient(eps_real, eps_fake, alpha * alpha)
        loss_student = vsd.student_loss(x0, grad)
        values = {"loss_student": self._apply(loss_student, self.student_params, self.opt_student,
                                              self.sched_student, "student")}
        if self.ema is not None:
            decay = float(self.config.ema_decay)
            with torch.no_grad():
                for e, (_, p) in zip(self.ema, self.student_named):
                    e.mul_(decay).add_(p.detach().float(), alpha=1 - decay)

        # fake score: denoising loss on the (detached) student samples, 10 % null prompts
        fake_losses = []
        for k in range(self.config.fake_updates_per_step):
            if k > 0:
                z, cond = self._draw_batch()
                with torch.no_grad():
                    x0 = vsd.one_step_x0(self.predict("student", z, last, cond), z, schedule)
            sample = x0.detach()
            t2 = self._draw_ints(lambda n: vsd.fake_timesteps(n, schedule, self.generator)).to(self.device)
            eps2 = self._draw_noise(self.teacher.latent_shape)
            drop = self._draw_ints(lambda n: vsd.null_prompt_mask(n, self.generator))
            alpha2, sigma2 = schedule.alpha_sigma(t2, sample)
            x_t2 = vsd.add_noise(sample, eps2, alpha2, sigma2)
            cond2 = cond.where(drop.to(self.device), self.cache.null.to(self.device))
            eps_pred = self._eps("fake", x_t2, t2, cond2, alpha2, sigma2)
            loss_fake = vsd.fake_score_loss(eps_pred, eps2, alpha2 * alpha2)
            fake_losses.append(self._apply(loss_fake, self.fake_params, self.opt_fake, self.sched_fake, "fake"))
        values["loss_fake"] = sum(fake_losses) / len(fake_losses)
        values["lr_student"] = self.sched_student.get_last_lr()[0]
        self.step += 1
        self.losses = values
        return values

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step, "run_id": self.run_id, "teacher": self.config.teacher,
                "teacher_fingerprint": self.teacher.fingerprint, "student_adapter": self.config.student_adapter,
                "fake_adapter": self.config.fake_adapter, "tool": "wadi-distill", "format": 1}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (rank 0 only) and prune beyond the total limit."""
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            with atomic_path(path, directory=True) as tmp:
                save_file(_state(self.student_named), str(tmp / "student.safetensors"))
                save_file(_state(self.fake_named), str(tmp / "fake.safetensors"))
                torch.save(self.opt_student.state_dict(), tmp / "optimizer_student.pt")
                torch.save(self.opt_fake.state_dict(), tmp / "optimizer_fake.pt")
                torch.save({"student": self.sched_student.state_dict(), "fake": self.sched_fake.state_dict()},
                           tmp / "schedulers.pt")
                if self.ema is not None:
                    save_file({n: e.contiguous() for (n, _), e in zip(self.student_named, self.ema)},
                              str(tmp / "ema.safetensors"))
                rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["torch_cuda"] = torch.cuda.get_rng_state()
                save_file(rng, str(tmp / "rng.safetensors"))
                if self.plan is not None:
                    self.plan.save(tmp / "plan.json")
                (tmp / "state.json").write_text(json.dumps(self.checkpoint_state(), indent=1) + "\n")
            self._prune()
        self.accelerator.wait_for_everyone()
        return path

    def _remove_partial_writes(self) -> None:
        """Delete temporary folders a killed run left while writing a checkpoint or final/ (never complete ones)."""
        if not self.output_dir.is_dir():
            return
        for child in self.output_dir.iterdir():
            if child.is_dir() and re.match(r"^\.(checkpoint-\d+|final)\..*\.tmp$", child.name):
                shutil.rmtree(child, ignore_errors=True)

    def _prune(self) -> None:
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        existing = list_checkpoints(self.output_dir)
        for _, old in existing[: max(0, len(existing) - limit)]:
            shutil.rmtree(old)

    def resolve_resume(self, resume: str) -> Path | None:
        if resume == "latest":
            found = list_checkpoints(self.output_dir)
            return found[-1][1] if found else None
        path = Path(resume)
        if not path.is_dir():
            raise WadiInputError(f"The checkpoint folder {path} does not exist.")
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore adapters, optimizers, schedulers, EMA, RNG and step from ``path`` (refusing other runs)."""
        state_path = path / "state.json"
        if not state_path.is_file():
            raise WadiInputError(f"{path} is not a wadi-distill checkpoint (no state.json).")
        state = read_json(state_path)
        if state.get("run_id") != self.run_id:
            raise WadiInputError(f"The checkpoint {path} was written by another run (another teacher, plan, "
                                 "prompts or batch size); it cannot be resumed here.")
        _load_state(self.student_named, load_file(str(path / "student.safetensors")), "student adapter", path)
        _load_state(self.fake_named, load_file(str(path / "fake.safetensors")), "fake adapter", path)
        self.opt_student.load_state_dict(torch.load(path / "optimizer_student.pt", weights_only=True))
        self.opt_fake.load_state_dict(torch.load(path / "optimizer_fake.pt", weights_only=True))
        scheds = torch.load(path / "schedulers.pt", weights_only=True)
        self.sched_student.load_state_dict(scheds["student"])
        self.sched_fake.load_state_dict(scheds["fake"])
        if self.ema is not None and (path / "ema.safetensors").is_file():
            ema = load_file(str(path / "ema.safetensors"))
            self.ema = [ema[n].clone() for n, _ in self.student_named]
        rng = load_file(str(path / "rng.safetensors"))
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        self.step = int(state["step"])

    # ---------------------------------------------------------------- outputs
    def student_model(self) -> nn.Module:
        return self.full_student if self.full_student is not None else self.base

    @torch.no_grad()
    def validation_images(self, n: int | None = None) -> torch.Tensor:
        cond = self.validation_cond
        if n is not None:
            cond = cond.select(slice(0, n))
        seeds = list(range(len(cond)))
        if self.full_student is not None:
            return one_step_images(self.teacher, self.full_student, cond, seeds, device=self.device)
        with use_adapter(self.base, "student"):
            return one_step_images(self.teacher, self.base, cond, seeds, device=self.device)

    def merged_student_state(self) -> dict[str, torch.Tensor]:
        """The student as a plain denoiser state dict (adapter merged; the frozen base left untouched)."""
        if self.full_student is not None:
            return {k: v.detach().cpu().contiguous() for k, v in self.full_student.state_dict().items()}
        model = copy.deepcopy(self.base)
        remove_lorad(model, merge=True, adapter_name="student")
        return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def write_final(self) -> tuple[Path, Path | None, Path, Path]:
        """``OUT/final/``: the adapter folder files (LoRaD/LoRA), the merged ``student.safetensors``, samples.

        The merged student comes from :func:`wadi_distill.export.export_merged` (the teacher's keys and dtypes)
        when the teacher is a diffusers folder, else from merging in memory.
        """
        from wadi_distill.lorad.serialization import ADAPTER_WEIGHTS, save_adapter

        final = self.output_dir / "final"
        with atomic_path(final, directory=True) as tmp:
            adapter_path: Path | None = None
            if self.full_student is None:
                # save_adapter writes its folder atomically; the fresh temporary folder is that folder
                save_adapter(self.base, tmp, self.plan, adapter_name="student")
                adapter_path = final / ADAPTER_WEIGHTS
                meta = {"teacher": self.config.teacher, "teacher_fingerprint": self.teacher.fingerprint,
                        "steps": self.step, "run_id": self.run_id, "config": asdict(self.config)}
                (tmp / "training.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
                if self.ema is not None:
                    save_file({n: e.contiguous() for (n, _), e in zip(self.student_named, self.ema)},
                              str(tmp / "adapter_ema.safetensors"))
            if self.full_student is None and self.teacher.family != "builtin":
                from wadi_distill.export import export_merged

                export_merged(self.teacher.source, tmp, tmp / "student.safetensors")
            else:
                save_file(self.merged_student_state(), str(tmp / "student.safetensors"))
            images = self.validation_images(self.config.final_samples)
            (tmp / "samples").mkdir()
            save_image_grid(images, tmp / "samples" / "grid.png")
            (tmp / "samples" / "prompts.json").write_text(json.dumps(self.validation_prompts[: len(images)]))
        return final, adapter_path, final / "student.safetensors", final / "samples" / "grid.png"

    # ---------------------------------------------------------------- the loop
    def train(self) -> DistillResult:
        config = self.config
        resume_path: Path | None = None
        if config.resume:
            resume_path = self.resolve_resume(config.resume)
        if resume_path is not None:
            self.load_checkpoint(resume_path)
        if self.is_main:
            self._remove_partial_writes()
        logger = _Logger(self.output_dir, self.step, config.tensorboard) if self.is_main else None
        if self.is_main:
            write_json_atomic(self.output_dir / "run.json", {"run_id": self.run_id, "config": asdict(config),
                                                             "teacher_fingerprint": self.teacher.fingerprint})
        progress = None
        if self.is_main and config.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(TextColumn("[bold]VSD"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[losses]}"), transient=False)
            task = progress.add_task("train", total=config.max_steps, completed=self.step, losses="")
            progress.start()
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()
                values = self.train_step()
                values["step_seconds"] = time.perf_counter() - started
                if logger is not None:
                    logger.scalars(self.step, values)
                if progress is not None:
                    progress.update(task, completed=self.step, losses=(
                        f"student {values['loss_student']:.4g}  fake {values['loss_fake']:.4g}"))
                if self.step % config.checkpointing_steps == 0 or self.step == config.max_steps:
                    self.save_checkpoint()
                if config.validation_steps and self.step % config.validation_steps == 0 and self.is_main:
                    grid = save_image_grid(self.validation_images(),
                                           self.output_dir / "validation" / f"step-{self.step:06d}.png")
                    if logger is not None:
                        logger.images(self.step, "validation", grid)
        finally:
            if progress is not None:
                progress.stop()
            if logger is not None:
                logger.close()
        final = adapter = merged = samples = None
        if self.is_main:
            final, adapter, merged, samples = self.write_final()
        self.accelerator.wait_for_everyone()
        return DistillResult(self.output_dir, self.step, dict(self.losses), final, adapter, merged, samples,
                             _state(self.student_named), _state(self.fake_named))


def distill(config: DistillConfig, *, teacher: Teacher | None = None) -> DistillResult:
    """Run VSD distillation as ``config`` says (a notebook-friendly entry point; the CLI calls this)."""
    return VSDTrainer(config, teacher=teacher).train()
