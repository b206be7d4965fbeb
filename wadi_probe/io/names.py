"""Tensor and module names: the one place wrapper prefixes are taken off a stored name.

Checkpoints and adapters reach us wrapped by whatever saved them: ``module.`` (DataParallel), ``_orig_mod.``
(``torch.compile``), ``base_model.model.`` (PEFT), ``unet.`` / ``transformer.`` (a pipeline's sub-model) or
``model.diffusion_model.`` (an LDM single file). :func:`strip_prefixes` removes such prefixes from the front of
one name, as many as are stacked.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["WRAPPER_PREFIXES", "MODEL_PREFIXES", "ADAPTER_PREFIXES", "strip_prefixes"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
MODEL_PREFIXES = ("unet.", "transformer.")
# what an adapter file's module paths may carry before the denoiser's own module path
# (``diffusion_model.``: the Lightning LoRAs of Qwen-Image and other ComfyUI-style files)
ADAPTER_PREFIXES = WRAPPER_PREFIXES + MODEL_PREFIXES + ("model.diffusion_model.", "diffusion_model.", "model.")


def strip_prefixes(name: str, prefixes: Iterable[str]) -> str:
    """``name`` without any of ``prefixes`` at its front, repeatedly (``module.unet.x`` → ``x``)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix):]
                changed = True
    return name
