"""Student kinds of the VSD loop, one interface: what trains, where it runs, how it is written out.

- :class:`AdapterStudent`: a LoRaD (or the project's LoRA) adapter ``"student"`` on the shared frozen base, its
  layers and ranks from a plan;
- :class:`FullStudent`: a separate trainable copy of the base weights (full fine-tuning);
- :class:`wadi_distill.vsd.peft_student.PeftStudent`: a frozen copy carrying a ``peft`` LoRA/DoRA adapter (the
  baselines LoRaD is compared to), a subclass of :class:`FullStudent` kept beside the PEFT functions it uses.

The trainer asks a student to :meth:`~Student.attach` to the base (before the fake score's adapter is injected),
then for its :meth:`~Student.trainable` parameters, runs it through :attr:`~Student.module` with adapter
:attr:`~Student.adapter_name` switched on, and lets it :meth:`~Student.write` its final files. A new kind is a
new subclass here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


class AdapterStudent(Student):
    """A LoRaD or LoRA adapter ``"student"`` on the shared base (``kind`` lorad | lora)."""

    adapter_name = "student"

    def __init__(self, kind: str = "lorad") -> None:
        self.kind = kind

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
        if teacher.family == "builtin":
            write_safetensors(self.merged_state(), folder / "student.safetensors")
        else:  # the teacher's own keys and dtypes, read lazily from its files
            from wadi_distill.export import export_merged

            # the adapter by its file: the merged student is written beside it, in the same folder
            export_merged(teacher.source, folder / ADAPTER_WEIGHTS, folder / "student.safetensors")
        return folder / ADAPTER_WEIGHTS


class FullStudent(Student):
    """Every weight trains: a separate fp32 copy of the base, made before any adapter is injected."""

    kind = "full"

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


def student_for(config: Any) -> Student:
    """The student kind ``config.student_adapter`` names (lorad, lora or full)."""
    if config.student_adapter == "full":
        return FullStudent()
    return AdapterStudent(config.student_adapter)
