"""Export a merged student: the teacher's weights with the adapter's rotation written in, nothing else changed.

The teacher is read lazily, one tensor at a time (:func:`wadi_probe.io.checkpoints.open_checkpoint`); adapted
weights are rotated (Θ = A·B in fp32, :func:`wadi_probe.rotation.rotate_pairs`) and cast back to the teacher's
dtype, every other tensor passes through untouched, and the result is written under the teacher's own key
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
from wadi_probe.io.checkpoints import TORCH_SUFFIXES, lazy_tensors, open_checkpoint, write_like
from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import rotate_pairs

__all__ = ["ExportResult", "merged_weight", "export_merged", "merge_into_checkpoint"]

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


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, kind: str = "lorad", scale: float = 1.0) -> torch.Tensor:
    """The weight an adapter gives: R_Θ(W) with Θ = A·B in fp32 (LoRaD) or W + scale·B·A (LoRA), in W's dtype.

    Computes exactly what :meth:`wadi_distill.lorad.layer.LoRaDLayer.merge` writes, so in-model merging and file
    export agree bit for bit.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    if kind == "lorad":
        dtype = torch.promote_types(a.dtype, torch.float32)
        adapted = rotate_pairs(matrix, a.to(matrix.device, dtype) @ b.to(matrix.device, dtype))
    else:
        delta = b.to(matrix.device) @ a.to(matrix.device)
        compute = torch.promote_types(matrix.dtype, delta.dtype)
        adapted = (matrix.to(compute) + scale * delta.to(compute)).to(matrix.dtype)
    return adapted.reshape(weight.shape)


def _model_config(teacher: Path) -> Path | None:
    """config.json of the teacher's denoiser (model folder or pipeline root), if there is one."""
    if teacher.is_file():
        return None
    for folder in (teacher / "unet", teacher / "transformer", teacher):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    return None


def export_merged(teacher_dir: str | Path, adapter_path: str | Path, output: str | Path) -> Path:
    """Write the merged student (see :func:`merge_into_checkpoint`) and return the output path."""
    return merge_into_checkpoint(teacher_dir, adapter_path, output).path


def merge_into_checkpoint(teacher_dir: str | Path, adapter_path: str | Path, output: str | Path) -> ExportResult:
    """Write the teacher with the adapter at ``adapter_path`` merged in, to ``output``.

    ``output`` ending in ``.safetensors`` (or ``.bin``/``.pt``) is one weights file with the teacher's key names
    and dtypes; anything else is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    that ``from_pretrained`` reads. The adapter may be the project's own folder or an official theta checkpoint;
    one made for another base is refused before anything is written.
    """
    teacher_dir, output = Path(teacher_dir).expanduser(), Path(output).expanduser()
    with open_checkpoint(teacher_dir) as teacher:
        shapes = {name: teacher.shape(name) for name in teacher.names()}
        adapter: AdapterFile = read_adapter(adapter_path, base_shapes=shapes)
        sources = {teacher.source_file(n).resolve() for n in teacher.names()}
        if output.resolve() in sources:
            raise WadiInputError(f"{output} is the teacher's own weights file; write the merged student elsewhere.")
        scales = (adapter.config.get("scales") or {}) if adapter.kind == "lora" else {}
        by_weight = {f"{module}.weight": module for module in adapter.factors}

        def override(name: str) -> torch.Tensor | None:
            module = by_weight.get(name)
            if module is None:
                return None
            a, b = adapter.factors[module]
            return merged_weight(teacher.tensor(name), a, b, kind=adapter.kind, scale=float(scales.get(module, 1.0)))

        tensors = lazy_tensors(teacher, override=override)
        metadata = {"format": "pt", "wadi_merged_adapter": adapter.path.name}
        dtypes = sorted({str(teacher.dtype(n)).replace("torch.", "") for n in teacher.names()})
        if output.suffix == ".safetensors" or output.suffix in TORCH_SUFFIXES:
            write_like(teacher, tensors, output, metadata=metadata if output.suffix == ".safetensors" else None)
        else:
            config = _model_config(teacher_dir)
            if config is None:
                raise WadiInputError(
                    f"{teacher_dir} has no config.json, so a diffusers folder cannot be written; name a .safetensors output."
                )
            if output.exists() and not output.is_dir():
                raise WadiInputError(f"{output} exists and is not a folder.")
            with atomic_path(output, directory=True) as tmp:
                shutil.copyfile(config, tmp / "config.json")
                write_like(teacher, tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        return ExportResult(output, len(adapter.factors), len(teacher.names()), ",".join(dtypes), adapter.kind, adapter.official)
