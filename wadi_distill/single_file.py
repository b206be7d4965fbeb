"""Single-file export: the merged student UNet under the original CompVis/LDM key names (``model.diffusion_model.…``).

ComfyUI, A1111/Forge and most community tools read Stable Diffusion as one ``.safetensors`` file in the original
LDM layout, not as a diffusers folder. The name map is held to diffusers' own converter
(``convert_ldm_unet_checkpoint``) applied to names: candidate LDM names come from
:func:`wadi_probe.io.ldm.diffusers_to_ldm_names`, and a name is accepted only when diffusers' converter
(:func:`wadi_probe.io.ldm.ldm_to_diffusers_names`) maps it back to the diffusers name it came from, so the file
reads back exactly with ``from_single_file``. This works for
the SD1.x (conv projections), SD2.x (linear projections) and SDXL (``label_emb`` / ``add_embedding``) UNets.

With ``into`` (the teacher's own single-file checkpoint), the UNet tensors of that file are replaced by the
student's and every other tensor (VAE, text encoders, …) is copied byte for byte, giving a complete checkpoint.
Everything is streamed one tensor at a time and written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path
from wadi_probe.io.checkpoints import LDM_UNET_PREFIX, open_checkpoint
from wadi_probe.io.outputs import check_free_space, check_outputs
from wadi_probe.io.formats.safetensors_io import SafetensorsSource, write_safetensors_streaming

__all__ = ["SingleFileResult", "ldm_unet_keys", "export_single_file"]

# EMA copies of the UNet in an original checkpoint ("model_ema.<flattened name>"): they would still hold the teacher
_EMA_PREFIX = "model_ema."


@dataclass
class SingleFileResult:
    """What :func:`export_single_file` wrote."""

    path: Path
    unet_tensors: int
    merged_layers: int
    dtype: str
    into: Path | None = None
    copied_tensors: int = 0
    dropped_ema: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)


def ldm_unet_keys(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` names -> full LDM keys (``model.diffusion_model.…``).

    Raises WadiInputError when the weights are not a UNet or when some name has no LDM key that diffusers'
    converter (:func:`wadi_probe.io.ldm.ldm_to_diffusers_names`) maps back to it.
    """
    from wadi_probe.io.ldm import diffusers_to_ldm_names, ldm_to_diffusers_names

    if "conv_in.weight" not in shapes or not any(name.startswith("down_blocks.") for name in shapes):
        raise WadiInputError("--format ldm writes the original single-file layout of SD1.x/2.x/XL UNets only; these "
                             "weights are not a UNet2DConditionModel (use --format diffusers).")
    candidate = diffusers_to_ldm_names(list(shapes))
    back = ldm_to_diffusers_names(list(candidate.values()))
    wrong = [name for name in shapes if back.get(candidate[name]) != name]
    if wrong:
        raise WadiInputError(
            f"{len(wrong)} of {len(shapes)} UNet tensors have no LDM name that diffusers reads back to them "
            f"(first: {wrong[0]}); this UNet layout cannot be written as an original single file."
        )
    return {name: LDM_UNET_PREFIX + candidate[name] for name in shapes}


def _adapter_override(teacher: Any, adapter_path: str | Path) -> tuple[Callable[[str], torch.Tensor], int, str]:
    """A name -> merged tensor function (teacher's tensor where the adapter does not touch it)."""
    from wadi_distill.lorad.serialization import read_adapter
    from wadi_probe.rotation import merged_weight

    shapes = {name: teacher.shape(name) for name in teacher.names()}
    adapter = read_adapter(adapter_path, base_shapes=shapes)
    by_weight = {f"{module}.weight": module for module in adapter.factors}

    def tensor(name: str) -> torch.Tensor:  # what export's merge writes, for the same tensor
        module = by_weight.get(name)
        if module is None:
            return teacher.tensor(name)
        a, b = adapter.factors[module]
        return merged_weight(teacher.tensor(name), a, b, kind=adapter.kind, scale=adapter.lora_scale)

    return tensor, len(adapter.factors), adapter.path.name


def export_single_file(teacher: str | Path, adapter: str | Path | None, output: str | Path, *,
                       into: str | Path | None = None) -> SingleFileResult:
    """Write the student (``teacher`` with ``adapter`` merged in; the teacher itself when None) as an LDM file.

    Without ``into`` the file holds the UNet only, under ``model.diffusion_model.`` keys, in the teacher's dtypes.
    With ``into`` (an original ``.safetensors`` checkpoint of the same architecture) the output is that checkpoint
    with its UNet replaced, in the checkpoint's own UNet dtypes, every other tensor byte-identical (its EMA copy of
    the UNet, which would still be the teacher, is left out). A mismatching UNet is refused before anything is written.
    """
    teacher_path, output = Path(teacher).expanduser(), Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise WadiInputError(f"{output} should end in .safetensors (the single-file format).")
    check_outputs({"single-file student": output}, [teacher_path, adapter, into])
    with open_checkpoint(teacher_path) as source:
        shapes = {name: source.shape(name) for name in source.names()}
        keys = ldm_unet_keys(shapes)
        if adapter is not None:
            fetch_merged, merged_layers, adapter_name = _adapter_override(source, adapter)
        else:
            fetch_merged, merged_layers, adapter_name = source.tensor, 0, ""
        by_key = {key: name for name, key in keys.items()}
        inputs = {Path(source.source_file(n)).resolve() for n in source.names()}
        metadata = {"format": "pt"}
        if adapter_name:
            metadata["wadi_merged_adapter"] = adapter_name
        result = SingleFileResult(output, len(keys), merged_layers, "")
        if into is None:
            if output.resolve() in inputs:
                raise WadiInputError(f"{output} is the teacher's own weights file; write the student elsewhere.")
            order = [keys[name] for name in source.names()]
            specs = {keys[name]: (shapes[name], source.dtype(name)) for name in source.names()}
            check_free_space(output, _spec_bytes(specs), "single-file student")
            fetch = lambda key: fetch_merged(by_key[key])  # noqa: E731
            _write(output, order, specs, fetch, metadata)
        else:
            into_path = Path(into).expanduser()
            if into_path.suffix != ".safetensors" or not into_path.is_file():
                raise WadiInputError(f"--into must be an existing original .safetensors checkpoint; {into_path} is not.")
            if output.resolve() in inputs | {into_path.resolve()}:
                raise WadiInputError(f"{output} is one of the input files; write the complete checkpoint elsewhere.")
            target = SafetensorsSource(into_path)
            try:
                result.into = into_path
                order, specs, fetch, copied, dropped = _into_plan(target, keys, shapes, fetch_merged, by_key)
                result.copied_tensors, result.dropped_ema = copied, dropped
                metadata = {**target.metadata, **metadata}
                check_free_space(output, _spec_bytes(specs), "single-file student")
                _write(output, order, specs, fetch, metadata)
            finally:
                target.close()
        unet_dtypes = sorted({str(specs[keys[name]][1]).replace("torch.", "") for name in keys})
        result.dtype = ",".join(unet_dtypes)
        result.bytes = output.stat().st_size
        return result


def _into_plan(target: SafetensorsSource, keys: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
               fetch_merged: Callable[[str], torch.Tensor], by_key: Mapping[str, str]):
    """Key order, specs and fetcher for writing the student's UNet into ``target``'s checkpoint."""
    stored = target.keys()
    unet = [key for key in stored if key.startswith(LDM_UNET_PREFIX)]
    if not unet:
        raise WadiInputError(f"{target.path} holds no model.diffusion_model.* tensors, so it is not an original SD checkpoint.")
    missing = sorted(set(by_key) - set(unet))
    extra = sorted(set(unet) - set(by_key))
    reshaped = [key for key in unet if key in by_key and tuple(target.shape(key)) != tuple(shapes[by_key[key]])]
    if missing or extra or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} student tensors are missing from it (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} of its UNet tensors are not in the student (first: {extra[0]})")
        if reshaped:
            key = reshaped[0]
            parts.append(f"{len(reshaped)} differ in shape (first: {key} {tuple(target.shape(key))} vs "
                         f"{tuple(shapes[by_key[key]])})")
        raise WadiInputError(f"the UNet in {target.path} does not match the student's: {'; '.join(parts)}.")
    order = [key for key in stored if not key.startswith(_EMA_PREFIX)]
    specs = {key: (tuple(target.shape(key)), target.dtype(key)) for key in order}

    def fetch(key: str) -> torch.Tensor:
        return fetch_merged(by_key[key]) if key in by_key else target.tensor(key)

    copied = len(order) - len(unet)
    return order, specs, fetch, copied, len(stored) - len(order)


def _spec_bytes(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Tensor bytes of a file written from ``specs`` (for the free-space check before the write)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())


def _write(output: Path, order: list[str], specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
           fetch: Callable[[str], torch.Tensor], metadata: Mapping[str, str]) -> None:
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as handle:
            write_safetensors_streaming(handle, order, specs, fetch, metadata)
