"""One call from a trained LoRaD folder to a diffusers pipeline: ``load_lorad(pipe, "out/final")``.

It reads the adapter (the project's folder or an official WaDi angle checkpoint), checks it against the
pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``), injects it and makes it active, so the pipeline
runs the student. :meth:`LoadedLoRaD.fuse` writes the rotation into the weights (no per-call cost, the way
diffusers' ``fuse_lora`` does for a LoRA), :meth:`LoadedLoRaD.unfuse` restores the teacher's weights bit for
bit, and :meth:`LoadedLoRaD.unload` hands back the plain teacher modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from wadi_distill.lorad.config import LoRaDConfig
from wadi_distill.lorad.model import lorad_layers, merge_lorad, remove_lorad, set_active_adapter, unmerge_lorad
from wadi_distill.lorad.serialization import load_adapter
from wadi_probe.errors import WadiInputError

__all__ = ["LoadedLoRaD", "denoiser_of", "load_lorad"]


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer`` (or ``pipe`` itself when it is a model)."""
    for attribute in ("unet", "transformer"):
        model = getattr(pipe, attribute, None)
        if isinstance(model, nn.Module):
            return model
    if isinstance(pipe, nn.Module):
        return pipe
    raise WadiInputError(f"{type(pipe).__name__} has no unet or transformer to put a LoRaD adapter on.")


def _adapter_path(path: str | Path) -> Path:
    """The adapter inside a training run's folder (``OUT`` or ``OUT/final``), or ``path`` itself."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / "adapter.safetensors").is_file() and (path / "final" / "adapter.safetensors").is_file():
        return path / "final"
    return path


@dataclass
class LoadedLoRaD:
    """A LoRaD adapter sitting on a pipeline's denoiser, with its config; fuse, unfuse or unload it.

    ``config`` is the adapter's :class:`LoRaDConfig` (ranks, layer shapes, the plan it was made from for the
    record; ``wadi_distill.plan.Plan.from_config(loaded.config)`` gives that plan back).
    """

    denoiser: nn.Module
    adapter_name: str
    config: LoRaDConfig
    path: Path

    @property
    def fused(self) -> bool:
        """True while the rotation is written into the denoiser's weights."""
        return any(layer.merged_adapter == self.adapter_name for layer in lorad_layers(self.denoiser).values())

    def fuse(self) -> "LoadedLoRaD":
        """Write R_Θ(W) into the weights (the teacher's are kept aside), so a forward costs what the teacher's does."""
        merge_lorad(self.denoiser, self.adapter_name)
        set_active_adapter(self.denoiser, self.adapter_name)
        return self

    def unfuse(self) -> "LoadedLoRaD":
        """Put the teacher's weights back bit for bit; the adapter stays on and active (rotating on the fly)."""
        unmerge_lorad(self.denoiser)
        return self

    def enable(self, enabled: bool = True) -> "LoadedLoRaD":
        """Run the student (``True``) or the plain teacher (``False``); unfuses first when turning it off."""
        if not enabled:
            self.unfuse()
        set_active_adapter(self.denoiser, self.adapter_name if enabled else None)
        return self

    def unload(self, *, keep_fused: bool = False) -> nn.Module:
        """Remove the wrappers: plain teacher layers (or, with ``keep_fused``, plain layers with the student's weights)."""
        return remove_lorad(self.denoiser, merge=keep_fused, adapter_name=self.adapter_name if keep_fused else None)


def load_lorad(pipe: Any, path: str | Path, *, adapter_name: str = "student", fuse: bool = False) -> LoadedLoRaD:
    """Put the LoRaD adapter at ``path`` onto ``pipe``'s denoiser and make it active; optionally fuse it.

    ``path`` is an adapter folder (a run's ``OUT/final`` or ``OUT`` itself), its ``adapter.safetensors``, or an
    official ``theta_a``/``theta_b`` checkpoint. An adapter made for another model is refused before the
    pipeline is touched. The factors are created on the denoiser's device in fp32 whatever its dtype, and the
    rotation runs in fp32 before the weight is cast back.
    """
    denoiser = denoiser_of(pipe)
    source = _adapter_path(path)
    config = load_adapter(denoiser, source, adapter_name=adapter_name, activate=True)
    loaded = LoadedLoRaD(denoiser, adapter_name, config, source)
    return loaded.fuse() if fuse else loaded
