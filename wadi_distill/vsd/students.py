"""Student kinds of the VSD loop, one interface: what trains, where it runs, how it is written out.

Every kind is registered by name in :data:`STUDENT_KINDS` (``DistillConfig.student_adapter`` picks one):

- ``lorad``, ``lora`` — :class:`AdapterStudent`: a LoRaD (or the project's LoRA) adapter ``"student"`` on the
  shared frozen base, its layers and ranks from a plan;
- ``full`` — :class:`FullStudent`: a separate trainable copy of the base weights (full fine-tuning);
- ``peft-lora``, ``peft-dora`` — :class:`PeftStudent`: a frozen copy carrying a ``peft`` LoRA/DoRA adapter (the
  baselines LoRaD is compared to) at a uniform ``--rank`` on the preset's layers (the PEFT-side functions are in
  :mod:`wadi_distill.vsd.peft_student`).

The trainer asks a student to :meth:`~Student.attach` to the base (before the fake score's adapter is injected),
then for its :meth:`~Student.trainable` parameters, runs it through :attr:`~Student.module` with adapter
:attr:`~Student.adapter_name` switched on, and lets it :meth:`~Student.write` its final files. A new kind is a
new subclass here with ``@register_student("name")`` (its :meth:`~Student.check_config` says which options it
takes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from wadi_distill.vsd.peft_student import PEFT_KINDS, inject_peft_student, merged_peft_state
from wadi_probe.errors import WadiInputError
from wadi_probe.io.formats.safetensors_io import write_safetensors


def named_subset(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of those of ``model``'s parameters that are in ``params``, in the model's order."""
    ids = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


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


def make_plan(config: Any, model: nn.Module):
    """The student's plan from ``--plan``, ``--rank-from-probe`` or ``--rank`` with ``--preset``, checked to fit."""
    from wadi_distill.plan import Plan, plan_from_preset

    if config.plan is not None:
        plan = Plan.load(config.plan)
    elif config.rank_from_probe is not None:  # the report reader is imported only for this (step memory)
        from wadi_distill.plan import plan_from_report
        from wadi_probe.report.schema import load_report

        plan = plan_from_report(model, load_report(config.rank_from_probe), budget=config.budget)
    else:
        plan = plan_from_preset(model, int(config.rank), config.preset)
    check_plan_fits(plan, model)
    return plan


class Student:
    """The interface every student kind implements (see the module docstring)."""

    kind = "base"
    adapter_name: str | None = None  # the adapter switched on in the shared base; None: the student's own module
    plan: Any = None
    module: nn.Module

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse, in one sentence, options this kind cannot train with (before anything is loaded or written)."""

    @classmethod
    def from_config(cls, name: str, config: Any) -> "Student":
        """The student of registered kind ``name`` that ``config`` asks for."""
        return cls()

    def attach(self, base: nn.Module, config: Any, generator: torch.Generator, device: torch.device) -> None:
        raise NotImplementedError

    def trainable(self, base: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trained tensor, in a fixed order (checkpoints store them by name)."""
        raise NotImplementedError

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The student as a plain denoiser state dict (the teacher's keys)."""
        raise NotImplementedError

    def write(self, folder: Path, teacher: Any) -> Path | None:
        """Write the student's files (adapter, merged ``student.safetensors``) into ``folder``; the adapter path."""
        write_safetensors(self.merged_state(), folder / "student.safetensors")
        return None


#: Every student kind by name (``DistillConfig.student_adapter``), in registration order.
STUDENT_KINDS: dict[str, type[Student]] = {}

S = TypeVar("S", bound=type[Student])


def register_student(*names: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Student` subclass under ``names`` in :data:`STUDENT_KINDS`."""
    def add(cls: S) -> S:
        for name in names:
            if name in STUDENT_KINDS:
                raise ValueError(f"A student kind named {name!r} is registered already.")
            STUDENT_KINDS[name] = cls
        return cls

    return add


def _check_one_layer_choice(config: Any) -> None:
    given = [config.rank is not None, config.rank_from_probe is not None, config.plan is not None]
    if sum(given) != 1:
        raise WadiInputError("Choose the student's layers and ranks with exactly one of --rank (with --preset), "
                             "--rank-from-probe or --plan (or train the full student with --full-finetune).")
    if config.rank is not None and int(config.rank) < 1:
        raise WadiInputError("rank must be at least 1.")


@register_student("lorad", "lora")
class AdapterStudent(Student):
    """A LoRaD or LoRA adapter ``"student"`` on the shared base (``kind`` lorad | lora)."""

    adapter_name = "student"

    def __init__(self, kind: str = "lorad") -> None:
        self.kind = kind

    @classmethod
    def check_config(cls, config):
        _check_one_layer_choice(config)

    @classmethod
    def from_config(cls, name, config):
        return cls(name)

    def attach(self, base, config, generator, device):
        from wadi_distill.lorad.model import inject_lorad

        self.plan = make_plan(config, base)
        inject_lorad(base, self.plan, adapter_name="student", kind=self.kind, generator=generator, activate=False)
        self.module = base

    def trainable(self, base):
        from wadi_distill.lorad.model import lorad_parameters

        return named_subset(base, lorad_parameters(base, "student"))

    def merged_state(self):
        from wadi_distill.lorad.model import remove_lorad

        model = copy.deepcopy(self.module)
        remove_lorad(model, merge=True, adapter_name="student")
        return _cpu_state(model)

    def write(self, folder, teacher):
        from wadi_distill.lorad.serialization import ADAPTER_WEIGHTS, save_adapter

        save_adapter(self.module, folder, self.plan, adapter_name="student", base_model_name_or_path=teacher.source)
        if not teacher.family.weights_on_disk:
            write_safetensors(self.merged_state(), folder / "student.safetensors")
        else:  # the teacher's own keys and dtypes, read lazily from its files
            from wadi_distill.export import export_merged

            # the adapter by its file: the merged student is written beside it, in the same folder
            export_merged(teacher.source, folder / ADAPTER_WEIGHTS, folder / "student.safetensors")
        return folder / ADAPTER_WEIGHTS


@register_student("full")
class FullStudent(Student):
    """Every weight trains: a separate fp32 copy of the base, made before any adapter is injected."""

    kind = "full"

    @classmethod
    def check_config(cls, config):
        if any([config.rank is not None, config.rank_from_probe, config.plan]):
            raise WadiInputError("--full-finetune trains every weight; it cannot be combined with --rank, "
                                 "--rank-from-probe or --plan.")

    def attach(self, base, config, generator, device):
        # .float() rather than .to(dtype): diffusers' ModelMixin.to warns about fp32-kept modules on every dtype
        # cast, even when there are none.
        self.module = copy.deepcopy(base).to(device).float()
        self.module.requires_grad_(True)
        self.module.train()

    def trainable(self, base):
        return list(self.module.named_parameters())

    def merged_state(self):
        return _cpu_state(self.module)


@register_student("peft-lora", "peft-dora")
class PeftStudent(FullStudent):
    """A frozen copy of the base with a ``peft`` LoRA (``kind="lora"``) or DoRA (``"dora"``) adapter on ``modules``
    (None: the layers of the preset plan at ``rank``, chosen when the student is attached)."""

    def __init__(self, kind: str, rank: int, modules: list[str] | None = None) -> None:
        if kind not in PEFT_KINDS:
            raise WadiInputError(f"PEFT student kind must be lora or dora, not {kind!r}.")
        self.kind, self.rank = kind, int(rank)
        self.modules = list(modules) if modules is not None else None

    @classmethod
    def check_config(cls, config):
        _check_one_layer_choice(config)
        if config.rank is None:
            raise WadiInputError("A PEFT student trains one uniform rank on the preset's layers: give --rank.")

    @classmethod
    def from_config(cls, name, config):
        return cls(name.removeprefix("peft-"), int(config.rank))

    def attach(self, base, config, generator, device):
        if self.modules is None:
            self.modules = [entry.module for entry in make_plan(config, base).layers]
        super().attach(base, config, generator, device)
        self._named = inject_peft_student(self.module, self.modules, self.rank, self.kind, seed=int(config.seed))
        self.module.to(device)

    def trainable(self, base):
        return self._named

    def merged_state(self):
        return merged_peft_state(self.module)


def student_for(config: Any) -> Student:
    """The student of the kind ``config.student_adapter`` names (a key of :data:`STUDENT_KINDS`)."""
    kind = STUDENT_KINDS.get(config.student_adapter)
    if kind is None:
        raise WadiInputError(f"student_adapter must be one of {', '.join(STUDENT_KINDS)}, not "
                             f"{config.student_adapter!r}.")
    return kind.from_config(config.student_adapter, config)
