"""Reading a local diffusers pipeline folder one component at a time, without network.

``model_index.json`` names each component's library and class; :func:`load_component` reads one with its
library's ``from_pretrained(local_files_only=True)``, detecting weight variants (fp16-only folders) per folder and
naming the component in every refusal.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

__all__ = ["read_model_index", "load_component", "weights_variant", "vae_decoder"]


_STEM = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_PLAIN_WEIGHTS = re.compile(rf"^{_STEM}(?:-\d+-of-\d+)?\.(?:safetensors|bin)$"
                            rf"|^{_STEM}\.(?:safetensors|bin)\.index\.json$")
# shards are named NAME-00001-of-00002.VARIANT.safetensors (older) or NAME.VARIANT-00001-of-00002.safetensors (newer)
_VARIANT_WEIGHTS = re.compile(rf"^{_STEM}(?:-\d+-of-\d+)?\.(?P<a>[^.-]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$"
                              rf"|^{_STEM}\.(?:safetensors|bin)\.index\.(?P<b>[^.]+)\.json$")


def weights_variant(folder: Path) -> str | None:
    """The variant (``fp16``, ...) to load from a component folder that holds only variant weight files.

    ``from_pretrained`` reads the plain ``diffusion_pytorch_model.safetensors`` unless told ``variant=``; folders
    that ship only ``diffusion_pytorch_model.fp16.safetensors`` (common for SDXL) need it named. ``None`` when
    plain weights are there (they are preferred) or no weights are found at all.
    """
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(_PLAIN_WEIGHTS.match(n) for n in names):
        return None
    for name in names:
        match = _VARIANT_WEIGHTS.match(name)
        if match:
            return match.group("a") or match.group("b")
    return None


def read_model_index(root: Path) -> dict:
    if not root.exists():
        raise WadiInputError(f"The teacher folder {root} does not exist.")
    if not root.is_dir():
        raise WadiInputError(f"The teacher {root} is a file; give a diffusers pipeline folder (with model_index.json).")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise WadiInputError(f"{root} is not a diffusers pipeline folder: it has no model_index.json.")
    return read_json(index_path)


def load_component(root: Path, index: dict, name: str, *, required: bool = True,
                    dtype: torch.dtype | None = None):
    """Load one pipeline component with its library's ``from_pretrained(local_files_only=True)``.

    Components are loaded one by one, not with ``DiffusionPipeline.from_pretrained``: a process that does not
    encode prompts skips the text encoders, a variant (fp16-only folders) is detected per folder, and every
    failure names the component in one sentence.
    """
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        if required:
            raise WadiInputError(f"The pipeline in {root} has no {name!r} component.")
        return None
    library, class_name = entry
    folder = root / name
    if not folder.is_dir():
        raise WadiInputError(f"The pipeline in {root} lists {name!r} but the folder {folder} is missing.")
    if library == "diffusers":
        import diffusers as lib
    elif library == "transformers":
        import transformers as lib
    else:
        raise WadiInputError(f"The {name!r} component of {root} comes from {library!r}, which is not supported.")
    cls = getattr(lib, class_name, None)
    if cls is None:
        raise WadiInputError(f"The {name!r} component of {root} is a {class_name}, unknown to {library}.")
    try:
        if name.startswith("tokenizer"):
            from transformers import AutoTokenizer

            try:
                return cls.from_pretrained(folder, local_files_only=True)
            except Exception:
                return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kwargs: dict[str, Any] = {"local_files_only": True}
        variant = weights_variant(folder)
        if variant is not None:
            kwargs["variant"] = variant
        if dtype is not None and library == "transformers":
            kwargs["dtype"] = dtype
        return cls.from_pretrained(folder, **kwargs)
    except WadiInputError:
        raise
    except Exception as exc:  # corrupt or incomplete component: one sentence, the cause chained
        raise WadiInputError(f"Could not load the {name!r} component from {folder}: {exc}".rstrip(".") + ".") from exc


def vae_decoder(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        vae.to(latents.device)
        images = vae.decode(latents.to(param.dtype) / scaling + shift, return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    return decode
