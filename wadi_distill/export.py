"""Export a merged student: the teacher's weights with the adapter's rotation written in, nothing else changed.

The teacher is read lazily, one tensor at a time (:func:`wadi_probe.io.checkpoints.open_checkpoint`); adapted
weights are merged by :func:`wadi_probe.rotation.merged_weight` (Θ = A·B in fp32, the same function a LoRaD
layer merges with) and cast back to the teacher's dtype, every other tensor passes through untouched, and the result is written under the teacher's own key
names (:func:`wadi_probe.io.checkpoints.write_like`). The output is a plain model: it loads with
``load_state_dict(strict=True)`` into the stock diffusers class, or with ``from_pretrained`` when written as a folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from wadi_distill.lorad.serialization import AdapterFile, read_adapter
from wadi_probe.io.atomic import atomic_path
from wadi_probe.io.checkpoints import (TORCH_SUFFIXES, denoiser_folder, lazy_tensors, open_checkpoint, stored_bytes,
                                       write_like)
from wadi_probe.io.outputs import check_free_space, check_outputs
from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import merged_weight

__all__ = ["ExportResult", "check_export_output", "export_merged", "merge_into_checkpoint"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class ExportResult:
    """What :func:`export_merged` wrote."""

    path: Path
    merged_layers: int
    tensors: int
    dtype: str
    adapter_kind: str
    official: bool


def _model_config(teacher: Path) -> Path | None:
    """config.json of the teacher's denoiser (model folder or pipeline root), if there is one."""
    config = None if teacher.is_file() else denoiser_folder(teacher) / "config.json"
    return config if config is not None and config.is_file() else None


def check_export_output(teacher: str | Path, adapter: str | Path, output: str | Path, *, into: str | Path | None = None,
                        overwrite: bool = False) -> str:
    """Refuse an export's output before any work (see :func:`wadi_probe.io.outputs.check_outputs`): a file
    (``.safetensors``/``.bin``/``.pt``) or a folder written whole, which replaces a non-empty folder only with
    ``overwrite``; returns what the output is called in sentences."""
    output = Path(output).expanduser()
    one_file = output.suffix == ".safetensors" or output.suffix in TORCH_SUFFIXES
    what = "merged student" if one_file else "merged student folder"
    check_outputs({what: output}, [teacher, adapter, into], replaced=() if one_file else (what,), overwrite=overwrite)
    return what


def export_merged(teacher_dir: str | Path, adapter_path: str | Path, output: str | Path, *,
                  overwrite: bool = False) -> Path:
    """Write the merged student (see :func:`merge_into_checkpoint`) and return the output path."""
    return merge_into_checkpoint(teacher_dir, adapter_path, output, overwrite=overwrite).path


def merge_into_checkpoint(teacher_dir: str | Path, adapter_path: str | Path, output: str | Path, *,
                          overwrite: bool = False) -> ExportResult:
    """Write the teacher with the adapter at ``adapter_path`` merged in, to ``output``.

    ``output`` ending in ``.safetensors`` (or ``.bin``/``.pt``) is one weights file with the teacher's key names
    and dtypes; anything else is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    that ``from_pretrained`` reads. The adapter may be the project's own folder or an official theta checkpoint;
    one made for another base is refused before anything is written, and so is an output that is, holds, lies
    inside or links to the teacher or the adapter (:func:`wadi_probe.io.outputs.check_outputs`); an existing
    non-empty folder is replaced only with ``overwrite``.
    """
    teacher_dir, output = Path(teacher_dir).expanduser(), Path(output).expanduser()
    what = check_export_output(teacher_dir, adapter_path, output, overwrite=overwrite)
    one_file = what == "merged student"
    with open_checkpoint(teacher_dir) as teacher:
        shapes = {name: teacher.shape(name) for name in teacher.names()}
        adapter: AdapterFile = read_adapter(adapter_path, base_shapes=shapes)
        sources = {teacher.source_file(n).resolve() for n in teacher.names()}
        if output.resolve() in sources:
            raise WadiInputError(f"{output} is the teacher's own weights file; write the merged student elsewhere.")
        by_weight = {f"{module}.weight": module for module in adapter.factors}

        def override(name: str) -> torch.Tensor | None:
            module = by_weight.get(name)
            if module is None:
                return None
            a, b = adapter.factors[module]
            return merged_weight(teacher.tensor(name), a, b, kind=adapter.kind, scale=adapter.lora_scale)

        tensors = lazy_tensors(teacher, override=override)
        # the adapter as the caller named it (a run's final/ merges from a temporary folder: its file name is stable)
        metadata = {"format": "pt", "wadi_merged_adapter": Path(adapter_path).name}
        dtypes = sorted({str(teacher.dtype(n)).replace("torch.", "") for n in teacher.names()})
        check_free_space(output, stored_bytes(teacher), what)
        if one_file:
            write_like(teacher, tensors, output, metadata=metadata if output.suffix == ".safetensors" else None)
        else:
            config = _model_config(teacher_dir)
            if config is None:
                raise WadiInputError(
                    f"{teacher_dir} has no config.json, so a diffusers folder cannot be written; name a .safetensors output."
                )
            with atomic_path(output, directory=True) as tmp:
                shutil.copyfile(config, tmp / "config.json")
                write_like(teacher, tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        return ExportResult(output, len(adapter.factors), len(teacher.names()), ",".join(dtypes), adapter.kind, adapter.official)
