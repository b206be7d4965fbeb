"""The VSD training loop: a one-step student and a fake score on one shared, frozen teacher base.

Roles on the same denoiser (LoRaD wrappers hold named adapters over frozen base weights):

- teacher ("real" score): no adapter active;
- student G: a :class:`~wadi_distill.vsd.students.Student` (adapter ``"student"`` from a plan, a separate full
  copy, or a PEFT adapter on a copy);
- fake score: adapter ``"fake"`` (LoRaD rank 32 by default, or LoRA).

Accelerate provides the device, mixed precision and the process group; gradients of the trainable tensors are
averaged over processes explicitly (together with the losses, so logs show global means), so every rank keeps
identical weights. All randomness comes from one CPU ``torch.Generator`` that every rank advances identically
(each takes its slice of the global batch), which is what makes checkpoints resume bit-for-bit. The rooms this
loop uses: :mod:`~wadi_distill.vsd.config` (options, validation), :mod:`~wadi_distill.vsd.identity` (run id),
:mod:`~wadi_distill.vsd.students`, :mod:`~wadi_distill.vsd.checkpoints`, :mod:`~wadi_distill.vsd.run_log`,
:mod:`~wadi_distill.vsd.step` (one step's losses from the roles' predictions) and
:mod:`~wadi_distill.vsd.losses` (the math).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
import weakref
from datetime import timedelta
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from wadi_distill.image_grid import save_image_grid
from wadi_distill.lorad.model import inject_lorad, lorad_layers, lorad_parameters
from wadi_distill.teachers.embedding_cache import EmbeddingCache, build_embedding_cache, cache_key, wait_for_cache
from wadi_distill.teachers.pipeline import Conditioning, Teacher, load_teacher
from wadi_distill.teachers.prompts import load_prompts
from wadi_distill.teachers.sampling import one_step_images
from wadi_distill.vsd import checkpoints as ckpt
from wadi_distill.vsd import losses as vsd
from wadi_distill.vsd.checkpoints import list_checkpoints
from wadi_distill.vsd.config import (FAKE_KINDS, TRAINING_OPTIONS, DistillConfig, on_cpu, option_name,
                                     resolve_mixed_precision, resolve_teacher_options, validate_config)
from wadi_distill.vsd.identity import RunIdentity, identity_for
from wadi_distill.vsd.preemption import RunStopped, StopSignals, any_process
from wadi_distill.vsd.run_lock import lock_run_folder
from wadi_distill.vsd.run_log import Console, RunLog
from wadi_distill.vsd.step import VSDStep
from wadi_distill.vsd.students import (STUDENT_KINDS, PeftStudent, Student, check_plan_fits, named_subset,
                                       student_for)
from wadi_probe.console import print_line
from wadi_probe.errors import WadiInputError, WadiRuntimeError
from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.io.jsonfile import read_json

__all__ = ["DistillConfig", "DistillResult", "VSDTrainer", "distill", "distill_peft", "list_checkpoints",
           "check_plan_fits", "STUDENT_KINDS", "FAKE_KINDS"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)
LAST_STEP = "last-step"  # final/last-step/: the raw weights of the last step beside final/'s average


@dataclass
class DistillResult:
    """What a finished run left behind (paths are None on ranks other than 0).

    ``final_dir``, ``adapter_path``, ``merged_path`` and ``student_state`` are the student ``final/`` holds: the
    weight average (or the last step's weights with ``ema_decay=None``); ``last_step_dir`` (``final/last-step/``)
    and ``last_step_state`` the raw weights of the last step.
    """

    output_dir: Path
    steps: int
    losses: dict[str, float]
    final_dir: Path | None
    adapter_path: Path | None
    merged_path: Path | None
    samples_path: Path | None
    student_state: dict[str, torch.Tensor]
    fake_state: dict[str, torch.Tensor]
    last_step_dir: Path | None = None
    last_step_state: dict[str, torch.Tensor] | None = None


# ------------------------------------------------------------------------------------------------ helpers


def _default_prompts(teacher: Teacher) -> list[str]:
    if teacher.default_prompts:
        return list(teacher.default_prompts)
    raise WadiInputError("A prompt file (--prompts) is needed for this teacher.")


def sync_gradients(params: list[nn.Parameter], world: int, loss: torch.Tensor) -> float:
    """Average the gradients of ``params`` and ``loss`` over all processes (one all-reduce, the DDP step for the
    trainable tensors only); returns the global mean loss."""
    value = loss.detach().float().reshape(1)
    if world <= 1:
        return float(value)
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([value.to(params[0].grad.device)] + [p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 1
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n
    return float(flat[0])


def _optimizer(params: list[nn.Parameter], lr: float, config: DistillConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def _reset_single_process_state() -> None:
    """Let one Python process (a notebook) run several trainings with other precisions or devices.

    Accelerate keeps a process-wide state that refuses a second ``Accelerator`` with another mixed precision;
    outside a multi-process launch it is safe to forget it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def training_options(config: DistillConfig) -> dict[str, Any]:
    """The options that change what a step computes (mixed precision as resolved), as a checkpoint records them."""
    options = {k: getattr(config, k) for k in TRAINING_OPTIONS}
    options["mixed_precision"] = resolve_mixed_precision(config)
    return options


def _flag(name: str, value: Any) -> str:
    return f"{option_name(name)} {value}"


# ------------------------------------------------------------------------------------------------ the run


class VSDTrainer:
    """Holds the models, optimizers and RNG of one run; :meth:`train` runs it. Use :func:`distill` normally.

    ``student`` gives the student object itself (e.g. a :class:`~wadi_distill.vsd.students.PeftStudent` on chosen
    layers); by default ``config.student_adapter`` names its kind.
    """

    def __init__(self, config: DistillConfig, teacher: Teacher | None = None, student: Student | None = None, *,
                 stop_note: bool = True) -> None:
        validate_config(config)
        # after a stop signal, print the line that says where the run continues (False: the caller, e.g. the demo
        # that removes its runs, says what happens instead)
        self.stop_note = stop_note
        # one run per folder: the lock (main process) is held until train() ends, close(), or a failed set-up
        self.run_lock = lock_run_folder(config.output_dir, note=print_line)
        weakref.finalize(self, self.run_lock.release)
        self.stop = StopSignals(config.checkpoint_signals).install()  # a stop signal during set-up ends it at once
        try:
            self._set_up(config, teacher, student)
        except BaseException:
            self.run_lock.release()
            raise
        finally:
            self.stop.restore()

    def close(self) -> None:
        """Release the output folder without training (:meth:`train` releases it itself)."""
        self.stop.restore()
        self.run_lock.release()

    def _set_up(self, config: DistillConfig, teacher: Teacher | None, student: Student | None) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        if not config.resume and list_checkpoints(self.output_dir):
            raise WadiInputError(f"{self.output_dir} already holds checkpoints; pass --resume latest to continue "
                                 "that run, or choose another output folder.")
        self.resume_path = ckpt.resolve_resume(config.resume, self.output_dir) if config.resume else None
        self.mixed_precision = resolve_mixed_precision(config)
        self._start_accelerator()
        self.console = Console(config.max_steps, bar=config.progress, every=config.log_every, enabled=self.is_main)
        half_text = None if self.cpu or self.weight_dtype == torch.float32 else self.weight_dtype
        # only the process that encodes the prompts loads the text encoders (T5-XXL is 19 GB in fp32)
        self.teacher = teacher if teacher is not None else load_teacher(
            config.teacher, text_encoder_dtype=half_text, load_text_encoders=self.is_main, progress=config.progress)
        resolve_teacher_options(config, self.teacher.family)  # before the run's identity and options
        self.schedule = self.teacher.schedule
        self.student = student if student is not None else student_for(config)
        self._prepare_models()  # first: a plan that does not fit is refused before anything is written
        self.prompts = self._load_prompts()
        self.prompt_key = cache_key(self.prompts, self.teacher.fingerprint, self.teacher.null_prompt)
        self.identity: RunIdentity = identity_for(
            teacher_fingerprint=self.teacher.fingerprint, weights_digest=self.teacher_digest,
            student=self.student.kind, plan_ranks=self.plan.ranks() if self.plan is not None else None,
            fake_kind=config.fake_adapter, fake_ranks=self.fake_plan.ranks(), prompts_key=self.prompt_key,
            batch_size=config.batch_size, processes=self.world)
        self.run_id = self.identity.run_id
        self._prepare_optimizers()
        self.step = 0
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.losses: dict[str, float] = {}
        if self.resume_path is not None:  # every checkpoint file is checked before the cache is written
            self.load_checkpoint(self.resume_path)
        self._prepare_conditioning()
        self.vsd_step = VSDStep(self.schedule, self.predict, self.cache.null.to(self.device), float(config.cfg),
                               fake_cfg=None if config.fake_cfg is None else float(config.fake_cfg),
                               sequential_cfg=bool(config.sequential_cfg),
                               dmd_normalization=bool(config.dmd_normalization))

    # ---------------------------------------------------------------- set-up
    def _start_accelerator(self) -> None:
        self.cpu = on_cpu(self.config.device)
        _reset_single_process_state()
        # the other ranks wait at the step's all-reduce while rank 0 writes a checkpoint (a full-fine-tuning SDXL
        # checkpoint with its Adam states is tens of GB): allow far longer than the default 10-30 minutes
        group = InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.cpu, kwargs_handlers=[group])
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES.get(self.mixed_precision, torch.float32)

    def _load_prompts(self) -> list[str]:
        config = self.config
        if config.prompts:
            return load_prompts(config.prompts, column=config.prompt_column)
        return _default_prompts(self.teacher)

    def _prepare_conditioning(self) -> None:
        """Rank 0 encodes the prompts into the cache; the others wait for it on disk (no barrier that can time out).

        Validation prompts are encoded first (a prompt the encoder refuses stops the run before anything is
        written); an output folder this run created is removed again if encoding fails.
        """
        teacher = self.teacher
        folder = self.output_dir / "embedding-cache" / self.prompt_key  # never overwrites another run's cache
        self.validation_prompts = list(self.config.validation_prompts
                                       or self.prompts[: self.config.num_validation_images])
        self.validation_cond: Conditioning | None = None
        if self.is_main:
            if teacher.encode_prompts is None:
                raise WadiInputError("The teacher has no text encoder to encode the prompts with.")
            if teacher.text_encoders is not None:
                teacher.text_encoders.to(self.device)
            if self.config.validation_prompts:  # only rank 0 draws validation images
                self.validation_cond = teacher.encode_prompts(self.validation_prompts)
            with self._remove_new_output_on_failure():
                self.cache = self._build_cache(folder)
            if self.validation_cond is None:
                self.validation_cond = self.cache.get(range(len(self.validation_prompts)))
        else:
            self.cache = wait_for_cache(folder, self.prompt_key)
        if self.cache.key != self.prompt_key:
            raise WadiInputError(f"The embedding cache in {folder} belongs to other prompts or another teacher.")
        teacher.free_text_encoders()
        gc.collect()

    def _build_cache(self, folder: Path) -> EmbeddingCache:
        started = time.perf_counter()
        cache = build_embedding_cache(folder, self.prompts, self.teacher.encode_prompts, key=self.prompt_key,
                                      null_prompt=self.teacher.null_prompt, notes=self.console.note)
        self.console.note(f"embedding cache ready: {len(self.prompts)} prompts in "
                          f"{time.perf_counter() - started:.1f} s ({folder})")
        return cache

    @contextlib.contextmanager
    def _remove_new_output_on_failure(self) -> Iterator[None]:
        """Remove the output folder again when this run created it and the block fails (nothing half-written)."""
        created = self.run_lock.created_folder or not self.output_dir.exists()
        try:
            yield
        except BaseException:
            if created and self.output_dir.is_dir():
                import shutil

                shutil.rmtree(self.output_dir, ignore_errors=True)
            raise

    def _prepare_models(self) -> None:
        config = self.config
        base = self.teacher.denoiser
        base.requires_grad_(False)
        base.eval()
        self.teacher_digest = self.teacher.weights_digest()  # before any cast: the run's identity
        init_gen = torch.Generator().manual_seed(int(config.seed) + 7919)
        self.student.attach(base, config, init_gen, self.device)
        self.plan = self.student.plan
        from wadi_distill.plan import plan_from_preset

        self.fake_plan = plan_from_preset(base, int(config.fake_rank), "paper")
        inject_lorad(base, self.fake_plan, adapter_name="fake", kind=config.fake_adapter, generator=init_gen,
                     activate=False)
        base.to(self.device)
        for p in base.parameters():  # the frozen base in the compute dtype; adapters stay fp32
            if not p.requires_grad:
                p.data = p.data.to(self.weight_dtype)
        self.base = base
        self._layers = list(lorad_layers(base).values())
        self.student_named = self.student.trainable(base)
        self.fake_named = named_subset(base, lorad_parameters(base, "fake"))
        for _, p in self.student_named + self.fake_named:
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            for m in {id(base): base, id(self.student.module): self.student.module}.values():
                if hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()

    def _prepare_optimizers(self) -> None:
        config = self.config
        self.student_params = [p for _, p in self.student_named]
        self.fake_params = [p for _, p in self.fake_named]
        opt_s = _optimizer(self.student_params, config.lr, config)
        opt_f = _optimizer(self.fake_params, config.fake_lr, config)
        # diffusers' warm-up: the rate rises linearly from 0 to --lr over --lr-warmup-steps, then stays. Made before
        # accelerate wraps the optimizers: with fp16's loss scaler it swaps the optimizer's step method in and out
        # around each step, and a scheduler made afterwards loses its hook on it (torch then warns at every run
        # that "optimizer.step() has been overridden after learning rate scheduler initialization")
        self.sched_student, self.sched_fake = (
            get_scheduler("constant_with_warmup", optimizer=o, num_warmup_steps=config.lr_warmup_steps)
            for o in (opt_s, opt_f))
        self.opt_student, self.opt_fake = self.accelerator.prepare(opt_s, opt_f)
        self.ema: EMAModel | None = None
        self.ema_note: str | None = None  # said once and recorded in run.json when a resume starts the average
        if config.ema_decay is not None:
            # decay(k) = min(ema_decay, 1 - (1 + k)^-ema_power) at the k-th update (vsd.config.ema_decay_at)
            self.ema = EMAModel(self.student_params, decay=float(config.ema_decay), min_decay=0.0,
                                update_after_step=0, use_ema_warmup=True, inv_gamma=1.0,
                                power=float(config.ema_power))

    def _set_ema_rule(self) -> None:
        """This run's --ema-decay and --ema-power on the average (a resume may change them from its step on)."""
        self.ema.decay, self.ema.power = float(self.config.ema_decay), float(self.config.ema_power)
        self.ema.use_ema_warmup, self.ema.inv_gamma, self.ema.min_decay = True, 1.0, 0.0

    def ema_started_at(self) -> int:
        """The step at which the average started (0, or the step a checkpoint without an average resumed from)."""
        return max(0, int(self.ema.update_after_step))

    # ---------------------------------------------------------------- model roles
    @contextlib.contextmanager
    def _active(self, name: str | None) -> Iterator[None]:
        """Like :func:`wadi_distill.lorad.model.use_adapter`, over a layer list gathered once (no module walk per call)."""
        saved = [layer.active_adapter for layer in self._layers]
        for layer in self._layers:
            layer.active_adapter = name if name is not None and name in layer.specs else None
        try:
            yield
        finally:
            for layer, previous in zip(self._layers, saved):
                layer.active_adapter = previous

    def _role(self, role: str) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """The module that plays ``role`` and the adapter switch it needs."""
        if role == "student" and self.student.module is not self.base:
            return self.student.module, contextlib.nullcontext()
        name = {"teacher": None, "student": self.student.adapter_name, "fake": "fake"}[role]
        return self.base, self._active(name)

    def predict(self, role: str, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw prediction of ``role`` in {"teacher", "student", "fake"} (fp32)."""
        model, switch = self._role(role)
        with self.accelerator.autocast(), switch:
            out = self.teacher.family.for_role(role)(model, x, t, cond)
        return out.float()

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
        """Backward, all-reduce, unscale, clip, step; returns the loss averaged over all processes."""
        if not torch.isfinite(loss).all():
            last = list_checkpoints(self.output_dir)
            where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
            raise WadiRuntimeError(f"The {role} loss became {loss.item()} at step {self.step + 1}; training stopped "
                                   f"and {where}.")
        # with gradient checkpointing the backward pass re-runs forwards: keep the role's adapter active
        _, switch = self._role(role)
        with switch:
            self.accelerator.backward(loss)
        value = sync_gradients(params, self.world, loss)
        self.accelerator.unscale_gradients(optimizer=optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        # a step fp16's loss scaler skipped (inf/NaN gradients) does not advance the warm-up, as accelerate's own
        # scheduler wrapper does
        if not getattr(optimizer, "step_was_skipped", False):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    def _student_update(self, z: torch.Tensor, cond: Conditioning) -> tuple[float, torch.Tensor]:
        """VSD gradient from the teacher and the fake score (same CFG scale) on the student's one-step sample."""
        t = self._draw_ints(lambda n: vsd.student_timesteps(n, self.schedule, self.generator)).to(self.device)
        noise = self._draw_noise(self.teacher.latent_shape)
        loss, x0 = self.vsd_step.student_loss(z, cond, t, noise)
        value = self._apply(loss, self.student_params, self.opt_student, self.sched_student, "student")
        if self.ema is not None:
            self.ema.step(self.student_params)
        return value, x0

    def _fake_update(self, sample: torch.Tensor, cond: Conditioning) -> float:
        """Denoising loss of the fake score on the (detached) student samples, 10 % null prompts."""
        t = self._draw_ints(lambda n: vsd.fake_timesteps(n, self.schedule, self.generator)).to(self.device)
        noise = self._draw_noise(self.teacher.latent_shape)
        use_null = self._draw_ints(lambda n: vsd.null_prompt_mask(n, self.generator)).to(self.device)
        loss = self.vsd_step.fake_loss(sample, cond, t, noise, use_null)
        return self._apply(loss, self.fake_params, self.opt_fake, self.sched_fake, "fake")

    def train_step(self) -> dict[str, float]:
        """One student update followed by ``fake_updates_per_step`` fake-score updates (losses: global means)."""
        z, cond = self._draw_batch()
        loss_student, x0 = self._student_update(z, cond)
        fake_losses = []
        for k in range(self.config.fake_updates_per_step):
            if k > 0:
                z, cond = self._draw_batch()
                with torch.no_grad():
                    x0 = self.vsd_step.sample(z, cond)
            fake_losses.append(self._fake_update(x0.detach(), cond))
        values = {"loss_student": loss_student, "loss_fake": sum(fake_losses) / len(fake_losses),
                  "lr_student": self.sched_student.get_last_lr()[0]}
        self.step += 1
        self.losses = values
        return values

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step, "run_id": self.run_id, "identity": self.identity.parts,
                "options": training_options(self.config), "teacher": self.config.teacher,
                "teacher_fingerprint": self.teacher.fingerprint, "student_adapter": self.student.kind,
                "fake_adapter": self.config.fake_adapter, "tool": "wadi-distill"}

    def _checkpoint_files(self) -> dict[str, Any]:
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        files: dict[str, Any] = {
            "student.safetensors": ckpt.tensors_state(self.student_named),
            "fake.safetensors": ckpt.tensors_state(self.fake_named),
            "optimizer_student.pt": self.opt_student.state_dict(), "optimizer_fake.pt": self.opt_fake.state_dict(),
            "schedulers.pt": {"student": self.sched_student.state_dict(), "fake": self.sched_fake.state_dict()},
            "rng.safetensors": rng,
        }
        if self.ema is not None:
            files["ema.pt"] = {**self.ema.state_dict(), "names": [n for n, _ in self.student_named]}
        if self.accelerator.scaler is not None:  # fp16: the loss scale continues on resume
            files["scaler.pt"] = self.accelerator.scaler.state_dict()
        if self.plan is not None:
            files["plan.json"] = self.plan.to_json()
        return files

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (rank 0 only) and prune beyond the total limit."""
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            ckpt.write_checkpoint(path, self._checkpoint_files(), self.checkpoint_state())
            ckpt.prune(self.output_dir, self.config.checkpoints_total_limit)
            self.console.note(f"checkpoint {path}")
        self.accelerator.wait_for_everyone()
        return path

    def resolve_resume(self, resume: str) -> Path | None:
        return ckpt.resolve_resume(resume, self.output_dir)

    def _check_options(self, path: Path, recorded: dict[str, Any] | None) -> None:
        """Refuse resuming with training options other than the checkpoint's, naming each one."""
        if not recorded:
            return
        now = training_options(self.config)
        changed = [k for k in TRAINING_OPTIONS if k in recorded and recorded[k] != now[k]]
        if changed:
            was = " ".join(_flag(k, recorded[k]) for k in changed)
            asked = " ".join(_flag(k, now[k]) for k in changed)
            raise WadiInputError(f"The checkpoint {path} was trained with {was}; this resume asks for {asked}. "
                                 "Resume with the checkpoint's values, or start a new run in another output folder.")

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizers, schedulers, EMA, scaler, RNG and step from ``path`` (refusing other runs)."""
        reader = ckpt.CheckpointReader(path)
        state = reader.state
        if state.get("run_id") != self.run_id:
            raise WadiInputError(self.identity.refusal(str(path), state.get("identity")))
        self._check_options(path, state.get("options"))
        ckpt.load_into(self.student_named, reader.tensors("student.safetensors"), "student adapter", path)
        ckpt.load_into(self.fake_named, reader.tensors("fake.safetensors"), "fake adapter", path)
        self.opt_student.load_state_dict(reader.obj("optimizer_student.pt"))
        self.opt_fake.load_state_dict(reader.obj("optimizer_fake.pt"))
        scheds = reader.obj("schedulers.pt")
        self.sched_student.load_state_dict(scheds["student"])
        self.sched_fake.load_state_dict(scheds["fake"])
        if self.ema is not None and reader.has("ema.pt"):
            ema = reader.obj("ema.pt")
            if ema.get("names", [n for n, _ in self.student_named]) != [n for n, _ in self.student_named]:
                raise WadiInputError(f"The EMA in {path} does not match this run's layers; it was written by "
                                     "another run.")
            self.ema.load_state_dict(ema)
            if not self.ema.use_ema_warmup:  # written before the ramp was the rule: a fixed decay
                self.ema_note = (f"the weight average in {path} used a fixed decay {self.ema.decay:g}; it continues "
                                 f"with decay min({self.config.ema_decay:g}, 1 - (1 + step)^-{self.config.ema_power:.3g})")
            self._set_ema_rule()
        elif self.ema is not None:  # a checkpoint of a run without an average: it starts here, its ramp from 0
            step = int(state["step"])
            self.ema.shadow_params = [p.detach().clone() for p in self.student_params]
            self.ema.optimization_step = self.ema.update_after_step = step
            self.ema_note = (f"the checkpoint {path} holds no weight average: the average starts from its weights "
                             f"at step {step}, its decay ramping up from there")
        if self.accelerator.scaler is not None and reader.has("scaler.pt"):
            self.accelerator.scaler.load_state_dict(reader.obj("scaler.pt"))
        rng = reader.tensors("rng.safetensors")
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        self.step = int(state["step"])

    # ---------------------------------------------------------------- outputs
    def student_model(self) -> nn.Module:
        return self.student.module

    @torch.no_grad()
    def validation_images(self, n: int | None = None) -> torch.Tensor:
        cond = self.validation_cond
        if n is not None:
            cond = cond.select(slice(0, n))
        seeds = list(range(len(cond)))
        model, switch = self._role("student")
        with switch:
            return one_step_images(self.teacher, model, cond, seeds, device=self.device)

    def merged_student_state(self) -> dict[str, torch.Tensor]:
        """The student as a plain denoiser state dict (adapter merged; the frozen base left untouched)."""
        return self.student.merged_state()

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Inside: the student's trainable tensors hold the EMA; the trained values come back afterwards."""
        self.ema.store(self.student_params)
        self.ema.copy_to(self.student_params)
        try:
            yield
        finally:
            self.ema.restore(self.student_params)

    def final_weights_record(self) -> dict[str, Any]:
        """What ``final/training.json`` says about which weights lie where (and how the average was taken)."""
        if self.ema is None:
            return {"final": "the raw weights of the last step (no weight average: --no-ema)"}
        start = self.ema_started_at()
        return {"final": "the weight average (EMA)", LAST_STEP: "the raw weights of the last step",
                "average": {"rule": "decay(k) = min(max_decay, 1 - (1 + k) ** -power), k = updates since start",
                            "max_decay": self.ema.decay, "power": self.ema.power, "started_at_step": start,
                            "steps_averaged": self.step - start,
                            "last_decay": float(getattr(self.ema, "cur_decay_value", None) or 0.0)}}

    def write_final(self) -> tuple[Path, Path | None, Path, Path | None]:
        """``OUT/final/``: the student's files (adapter folder files for LoRaD/LoRA, the merged
        ``student.safetensors``) holding the weight average, ``last-step/`` (the same files for the raw weights of
        the last step; none with ``--no-ema``), ``training.json`` and the average's samples."""
        final = self.output_dir / "final"
        averaged = self.ema_weights() if self.ema is not None else contextlib.nullcontext()
        with atomic_path(final, directory=True) as tmp:
            with averaged:  # first: an adapter student's write replaces the folder it writes
                adapter_path = self.student.write(tmp, self.teacher)
                images = self.validation_images(self.config.final_samples) if self.config.final_samples else None
            adapter_path = final / adapter_path.name if adapter_path is not None else None
            meta = {"teacher": self.config.teacher, "teacher_fingerprint": self.teacher.fingerprint,
                    "steps": self.step, "run_id": self.run_id, "identity": self.identity.parts,
                    "ema": self.ema is not None, "weights": self.final_weights_record(),
                    "config": asdict(self.config)}
            (tmp / "training.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
            if self.ema is not None:
                (tmp / LAST_STEP).mkdir()
                self.student.write(tmp / LAST_STEP, self.teacher)
            (tmp / "samples").mkdir()
            if images is not None:
                save_image_grid(images, tmp / "samples" / "grid.png")
                (tmp / "samples" / "prompts.json").write_text(json.dumps(self.validation_prompts[: len(images)]))
        grid = final / "samples" / "grid.png" if images is not None else None
        return final, adapter_path, final / "student.safetensors", grid

    # ---------------------------------------------------------------- the loop
    def _record_run(self) -> None:
        """``run.json``: the run's identity and current options, plus one entry per start saying what changed."""
        path = self.output_dir / "run.json"
        previous = read_json(path) if path.is_file() and self.resume_path is not None else {}
        now = asdict(self.config)
        before = previous.get("config", {})
        changed = {k: [before[k], now[k]] for k in now
                   if k in before and before[k] != now[k] and k not in ("resume", "extra")}
        history = list(previous.get("history", []))
        entry = {"step": self.step, "processes": self.world, "mixed_precision": self.mixed_precision,
                 "resumed_from": str(self.resume_path) if self.resume_path else None, "changed": changed}
        if self.ema_note is not None:
            entry["note"] = self.ema_note
        history.append(entry)
        write_json_atomic(path, {"run_id": self.run_id, "identity": self.identity.parts, "config": now,
                                 "mixed_precision": self.mixed_precision, "processes": self.world,
                                 "teacher_fingerprint": self.teacher.fingerprint, "history": history})
        if self.resume_path is not None:
            note = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no options changed"
            self.console.note(f"resumed at step {self.step} from {self.resume_path} ({note})")
            if self.ema_note is not None:
                self.console.note(self.ema_note)
        elif self.config.resume:
            self.console.note(f"no checkpoint in {self.output_dir} yet: starting at step 0")

    def _after_step(self, log: RunLog | None, values: dict[str, float]) -> None:
        config = self.config
        if log is not None:
            log.scalars(self.step, values)
        self.console.step(self.step, values)
        if self.step % config.checkpointing_steps == 0 or self.step == config.max_steps:
            self.save_checkpoint()
        if config.validation_steps and self.step % config.validation_steps == 0 and self.is_main:
            grid = save_image_grid(self.validation_images(),
                                   self.output_dir / "validation" / f"step-{self.step:06d}.png")
            self.console.note(f"validation images {grid}")
            if log is not None:
                log.images(self.step, "validation", grid)

    def _stopped(self, started_at: int) -> RunStopped:
        """After a stop signal: checkpoint the step just finished (unless it has one), say so in one line."""
        saved = (self.step == started_at and self.resume_path is not None) or (
            self.step > started_at and self.step % self.config.checkpointing_steps == 0)
        path = self.output_dir / f"checkpoint-{self.step}" if saved else self.save_checkpoint()
        stopped = self.stop.stopped(self.step, path if self.is_main else None)
        if self.stop_note:
            self.console.note(stopped.message())
        return stopped

    def train(self) -> DistillResult:
        """Train to ``max_steps`` and write ``final/``; a stop signal ends it early with a checkpoint
        (:class:`~wadi_distill.vsd.preemption.RunStopped`). The folder's lock is released however it ends."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> DistillResult:
        config = self.config
        log = None
        if self.is_main:
            ckpt.remove_partial_writes(self.output_dir)
            log = RunLog(self.output_dir, self.step, config.tensorboard)
            self._record_run()
        self.console.start(self.step)
        started_at, agree = self.step, any_process(self.world, self.device)
        self.stop.arm()
        try:
            while self.step < config.max_steps and not self.stop.requested(agree):  # between steps only
                started = time.perf_counter()
                values = self.train_step()
                values["step_seconds"] = time.perf_counter() - started
                self._after_step(log, values)
        finally:
            self.console.close()
            if log is not None:
                log.close()
        self.stop.restore()  # from here a signal is handled as before: final/ is written atomically or not at all
        if self.step < config.max_steps:
            raise self._stopped(started_at)
        final = adapter = merged = samples = None
        if self.is_main:  # the other ranks are done: nothing of theirs waits for final/
            final, adapter, merged, samples = self.write_final()
        last_step_dir = final / LAST_STEP if final is not None and self.ema is not None else None
        last_step = ckpt.tensors_state(self.student_named)
        if self.ema is not None:
            with self.ema_weights():
                student = ckpt.tensors_state(self.student_named)
        else:
            student = last_step
        return DistillResult(self.output_dir, self.step, dict(self.losses), final, adapter, merged, samples,
                             student, ckpt.tensors_state(self.fake_named), last_step_dir, last_step)


def distill(config: DistillConfig, *, teacher: Teacher | None = None, student: Student | None = None,
            stop_note: bool = True) -> DistillResult:
    """Run VSD distillation as ``config`` says (a notebook-friendly entry point; the CLI calls this).

    A stop signal ends it with :class:`~wadi_distill.vsd.preemption.RunStopped` after a checkpoint; ``stop_note``
    prints the line saying how to continue (a caller that discards the run passes False and says so itself)."""
    return VSDTrainer(config, teacher=teacher, student=student, stop_note=stop_note).train()


def distill_peft(config: DistillConfig, *, kind: str, rank: int, modules: list[str],
                 teacher: Teacher | None = None) -> DistillResult:
    """Run VSD (``config`` with ``student_adapter="full"``) with a PEFT LoRA or DoRA student of ``rank`` on exactly
    ``modules``; the result's ``merged_path`` holds the merged plain student."""
    if config.student_adapter != "full":
        raise WadiInputError("A PEFT student runs on the separate-student mode: set student_adapter='full'.")
    return distill(config, teacher=teacher, student=PeftStudent(kind, rank, modules))
