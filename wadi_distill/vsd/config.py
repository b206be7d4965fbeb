"""What a VSD run is asked to do: :class:`DistillConfig`, its choices, and its validation before anything is written.

``validate_config`` checks every option (values, combinations, the machine, the output folder) so that a bad
input is refused with one sentence before a single file is created.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from wadi_distill.vsd.preemption import DEFAULT_SIGNALS, parse_signals
from wadi_probe.choices import Choice
from wadi_probe.errors import WadiInputError


class MixedPrecision(Choice):
    """Compute dtype of the frozen teacher and of autocast; adapters and optimizer states stay fp32."""

    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class FakeKind(Choice):
    """The fake score's adapter on the shared base."""

    lorad = "lorad"
    lora = "lora"


# The student's weight average, on by default: an EMA whose decay ramps up from 0,
#   decay(k) = min(EMA_MAX_DECAY, 1 - (1 + k) ** -EMA_POWER),  k = updates since the average started,
# so a short run averages its last few dozen steps and a long one its last ~1 / (1 - EMA_MAX_DECAY). The raw
# weights of the last step jitter from step to step; final/ holds this average, final/last-step/ the raw weights.
EMA_MAX_DECAY = 0.999
EMA_POWER = 2 / 3

DEVICES = ("auto", "cpu", "cuda")  # wadi_probe.console.Device on the command line
FAKE_KINDS = tuple(k.value for k in FakeKind)

# Options that change what a step computes. Resuming with another value is refused (the checkpoint's optimizer
# and scheduler carry the old ones); everything else (max_steps, checkpointing, validation, logging) may change.
TRAINING_OPTIONS = ("lr", "fake_lr", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                    "lr_warmup_steps", "max_grad_norm", "fake_updates_per_step", "cfg", "fake_cfg", "use_8bit_adam",
                    "dmd_normalization", "seed", "mixed_precision", "gradient_checkpointing", "sequential_cfg",
                    "teacher_guidance")
# The weight average (ema_decay, ema_power) only reads the weights: another value on resume is applied from the
# resumed step and recorded in run.json's history.
#: The VSD guidance scale of the real and fake scores when a run gives none and the teacher family names none.
DEFAULT_CFG = 1.5


@dataclass
class DistillConfig:
    """Everything a VSD run needs; the CLI ``wadi-distill run`` fills one of these."""

    teacher: str
    output_dir: str
    prompts: str | None = None
    prompt_column: str | None = None
    # student
    student_adapter: str = "lorad"  # a kind of wadi_distill.vsd.students.STUDENT_KINDS: lorad | lora | full | ...
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
    # no weight decay: it shrinks every fully fine-tuned weight towards 0 and so biases the probe's finding on
    # norm vs direction changes; WaDi's reference code and SwiftBrush use none
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    fake_updates_per_step: int = 1
    # DMD's normalisation of the student's update: (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| per sample in place
    # of the schedule's weight w_t·(ε_real − ε_fake) (docs/distill.md says what it measured on builtin:digits)
    dmd_normalization: bool = False
    cfg: float | None = None  # None: the teacher family's default (1 for Flux.1), else DEFAULT_CFG
    # The fake score's guidance scale in the student step. None: cfg, the real score's (the paper's VSD, whose
    # target is then close to the unguided teacher's); 1: the fake score unguided (DMD2, SwiftBrush), whose target
    # is the real score's guided distribution.
    fake_cfg: float | None = None
    # the real score's embedded guidance (guidance-distilled teachers: FLUX.1-dev); None: the family's default
    teacher_guidance: float | None = None
    use_8bit_adam: bool = False
    ema_decay: float | None = EMA_MAX_DECAY  # the average's largest decay; None: no average (--no-ema)
    ema_power: float = EMA_POWER  # how fast the decay ramps up: decay(k) = min(ema_decay, 1 - (1 + k) ** -power)
    # runtime
    seed: int = 0
    device: str = "auto"
    mixed_precision: str | None = None  # None: what `accelerate launch` / its config says, else "no"
    gradient_checkpointing: bool = False
    # The guided passes' conditional and null-prompt halves one after the other instead of in one doubled batch:
    # a lower peak (benchmarks/RESULTS.md: 0.82x -> 0.78-0.80x of the paper-style loop's at batch 4), more kernel calls.
    sequential_cfg: bool = False
    # checkpoints and logs
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    validation_steps: int = 0
    validation_prompts: list[str] | None = None
    num_validation_images: int = 4
    tensorboard: bool = True
    progress: bool | None = True  # None: a bar on a terminal, plain lines otherwise
    log_every: int = 10  # plain log lines every N steps when no bar is shown
    final_samples: int = 4
    # signals that stop the run after its step with a checkpoint (exit code 75); Ctrl-C always does (exit code 130)
    checkpoint_signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    extra: dict[str, Any] = field(default_factory=dict)


def ema_decay_at(step: int, max_decay: float, power: float) -> float:
    """The weight average's decay at its ``step``-th update (0 for the first: the average starts at the weights)."""
    return min(float(max_decay), 1.0 - (1.0 + int(step)) ** -float(power))


def resolve_mixed_precision(config: DistillConfig) -> str:
    """``--mixed-precision`` when given, else what ``accelerate launch`` (flag or config file) exported, else no."""
    value = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    value = str(value.value if isinstance(value, Enum) else value).lower()
    if value not in {m.value for m in MixedPrecision}:
        raise WadiInputError(f"mixed precision must be no, fp16 or bf16, not {value!r}.")
    return value


def on_cpu(device: str) -> bool:
    """True when a run with ``--device device`` computes on the CPU."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    value = value.value if isinstance(value, Enum) else value
    if value not in allowed:
        raise WadiInputError(f"{what} must be one of {', '.join(allowed)}, not {value!r}.")
    return str(value)


def _validate_numbers(config: DistillConfig) -> None:
    for name in ("max_steps", "batch_size", "fake_updates_per_step", "fake_rank", "checkpointing_steps",
                 "log_every"):
        if int(getattr(config, name)) < 1:
            raise WadiInputError(f"{name.replace('_', '-')} must be at least 1.")
    for name in ("lr_warmup_steps", "validation_steps", "final_samples"):
        if int(getattr(config, name)) < 0:
            raise WadiInputError(f"{name.replace('_', '-')} must not be negative.")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise WadiInputError("checkpoints-total-limit must be at least 1.")
    for name in ("lr", "fake_lr", "max_grad_norm", "adam_epsilon"):
        value = float(getattr(config, name))
        if not math.isfinite(value) or value <= 0:
            raise WadiInputError(f"{name.replace('_', '-')} must be a positive number, not {value:g}.")
    for name in ("cfg", "fake_cfg"):
        value = getattr(config, name)
        if value is not None and (not math.isfinite(float(value)) or value < 0):
            raise WadiInputError(f"{name.replace('_', '-')} must be a non-negative number (1 turns guidance off), "
                                 f"not {value:g}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= float(getattr(config, name)) < 1.0:
            raise WadiInputError(f"{name.replace('_', '-')} must be in [0, 1).")
    if config.adam_weight_decay < 0:
        raise WadiInputError("adam-weight-decay must not be negative.")
    if not 0.0 < config.budget <= 1.0:
        raise WadiInputError(f"budget must be a fraction in (0, 1], not {config.budget:g}.")
    if config.ema_decay is not None and not 0.0 < float(config.ema_decay) < 1.0:
        raise WadiInputError(f"ema-decay must lie strictly between 0 and 1, not {float(config.ema_decay):g}.")
    if not math.isfinite(float(config.ema_power)) or config.ema_power <= 0:
        raise WadiInputError(f"ema-power must be a positive number, not {float(config.ema_power):g}.")


def _validate_student(config: DistillConfig) -> None:
    from wadi_distill.vsd.students import STUDENT_KINDS

    config.student_adapter = _choice(config.student_adapter, tuple(STUDENT_KINDS), "student_adapter")
    config.fake_adapter = _choice(config.fake_adapter, FAKE_KINDS, "fake_adapter")
    STUDENT_KINDS[config.student_adapter].check_config(config)
    builtin = str(config.teacher).startswith("builtin:") or (Path(config.teacher) / "digits_teacher.json").is_file()
    if config.prompts is None and not builtin:
        raise WadiInputError("A prompt file (--prompts) is needed for this teacher (only builtin teachers bring "
                             "their own prompts).")
    for name in ("prompts", "plan", "rank_from_probe"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            state = "is a folder, not a file" if Path(value).is_dir() else "does not exist"
            raise WadiInputError(f"The {name.replace('_', '-')} file {value} {state}.")


def _validate_machine(config: DistillConfig) -> None:
    from wadi_probe.device import resolve_device

    config.device = _choice(config.device, DEVICES, "device")
    resolve_device(config.device)  # the one device check of the project: cuda without a GPU is refused
    if resolve_mixed_precision(config) == "fp16" and on_cpu(config.device):
        raise WadiInputError("fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 (or no) on a CPU.")
    if config.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise WadiInputError("--use-8bit-adam needs the bitsandbytes package, which is not installed.") from exc


def resolve_teacher_options(config: DistillConfig, family: Any) -> None:
    """Settle, in ``config``, the options that depend on the loaded teacher's family (before anything is written):
    the real score's embedded guidance (refused for a denoiser without a guidance input) and the CFG scale (the
    family's default when none is given; a guidance-distilled teacher takes none on top of its embedding)."""
    family.set_guidance(config.teacher_guidance)
    config.teacher_guidance = family.guidance
    if config.cfg is None:
        config.cfg = family.default_cfg if family.default_cfg is not None else DEFAULT_CFG
    if family.guidance is not None and config.fake_cfg is not None and float(config.fake_cfg) != 1.0:
        raise WadiInputError(f"This {family.name} teacher is guidance-distilled (its guidance is the embedded "
                             f"--guidance, {family.guidance:g}), so classifier-free guidance on top does not apply: "
                             f"use --fake-cfg 1 or leave it out, not {config.fake_cfg:g}.")
    if family.guidance is not None and float(config.cfg) != 1.0:
        raise WadiInputError(f"This {family.name} teacher is guidance-distilled (its guidance is the embedded "
                             f"--guidance, {family.guidance:g}), so classifier-free guidance on top does not apply: "
                             f"use --cfg 1, not {config.cfg:g}.")


def validate_config(config: DistillConfig) -> None:
    """Refuse a config that cannot run, with one sentence, before anything is loaded or written."""
    _validate_student(config)
    _validate_numbers(config)
    _validate_machine(config)
    parse_signals(config.checkpoint_signals)
    from wadi_probe.io.outputs import check_outputs

    # the run folder is the run's own (checkpoints are pruned, final/ replaced): it may not be, hold, lie inside or
    # link to the teacher or any file the run reads
    check_outputs({"output folder": config.output_dir},
                  [config.teacher, config.prompts, config.plan, config.rank_from_probe], owned=("output folder",))


#: DistillConfig fields written by :func:`run_options`, each with its ``wadi-distill run`` option, in the order the
#: options are printed. The student's kind and layers are written separately (``--full-finetune``,
#: ``--rank-from-probe``/``--budget``, ``--plan``, ``--preset``/``--rank``, ``--student-adapter``).
RUN_OPTION_FIELDS = ("prompts", "prompt_column", "fake_adapter", "fake_rank", "max_steps", "batch_size",
                     "lr", "fake_lr", "cfg", "fake_cfg", "teacher_guidance", "fake_updates_per_step",
                     "dmd_normalization", "max_grad_norm", "lr_warmup_steps", "adam_weight_decay", "ema_decay",
                     "ema_power", "seed", "mixed_precision", "gradient_checkpointing", "sequential_cfg",
                     "use_8bit_adam")


def option_name(field_name: str) -> str:
    """The ``wadi-distill run`` option of a DistillConfig field: ``fake_updates_per_step`` → ``--fake-updates-per-step``."""
    return "--" + field_name.replace("_", "-")


def run_options(config: DistillConfig) -> dict[str, Any]:
    """The ``wadi-distill run`` options (``{"--lr": 0.001, ...}``) that train ``config``'s student again: every
    training setting with its value, so a record holding them needs no knowledge of the defaults of its day.
    Flags are ``True``; unset values (no prompt file, the family's own guidance) are left out. Settings without an
    option (Adam's betas and epsilon) appear only where they differ from the defaults, under their field names."""
    options: dict[str, Any] = {"--teacher": config.teacher}
    kind = config.student_adapter
    if kind == "full":
        options["--full-finetune"] = True
    else:
        if kind != "lorad":
            options["--student-adapter"] = kind
        if config.plan:
            options["--plan"] = config.plan
        elif config.rank_from_probe:
            options.update({"--rank-from-probe": config.rank_from_probe, "--budget": config.budget})
        else:
            options.update({"--preset": config.preset, "--rank": config.rank})
    for name in RUN_OPTION_FIELDS:
        value = getattr(config, name)
        if name == "ema_decay" and value is None:
            options["--no-ema"] = True
            continue
        if name == "ema_power" and config.ema_decay is None:
            continue
        if value is None or value is False:
            continue
        options[option_name(name)] = value
    defaults = DistillConfig(teacher="", output_dir="")
    for name in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        if getattr(config, name) != getattr(defaults, name):
            options[name] = getattr(config, name)
    return options


def run_command_line(options: dict[str, Any], output_dir: str = "OUT") -> str:
    """``wadi-distill run ...`` for :func:`run_options`' dict (flags bare; fields without an option left out)."""
    import shlex

    words = ["wadi-distill", "run"]
    for key, value in options.items():
        if not key.startswith("--"):
            continue
        if key == "--teacher":
            words += [key, str(value), "--output-dir", output_dir]
        elif value is True:
            words.append(key)
        else:
            words += [key, repr(value) if isinstance(value, float) else str(value)]  # repr: the shortest exact form
    return shlex.join(words)
