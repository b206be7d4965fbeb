"""The model a plan is made for: only its layer shapes matter, so diffusers models are built on the meta device.

:func:`load_model_config_only` builds a diffusers model from its ``config.json`` (no weights, no memory);
:func:`load_planning_model` also accepts the built-in digits teacher, which is small and loaded for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from wadi_probe.errors import WadiInputError
from wadi_probe.io.checkpoints import denoiser_folder
from wadi_probe.io.jsonfile import read_json

__all__ = ["backbone_param_count", "weight_layers", "read_model_config", "model_from_config",
           "load_model_config_only", "load_planning_model"]


def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the backbone (adapter parameters excluded), works on the meta device."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lorad_" not in n and ".lora_" not in n)


def weight_layers(model: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(module path, layer) of every layer of ``kinds`` in model order; LoRaD wrappers count as their base layer."""
    from wadi_distill.lorad.layer import LoRaDLayer

    found = []
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoRaDLayer) else module
        inside_wrapper = name.endswith(".base_layer") or ".base_layer." in name
        if isinstance(base, kinds) and not inside_wrapper:
            found.append((name, base))
    return found


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The denoiser's config dict of a model folder or pipeline root (a config.json path works too)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WadiInputError(f"{path} does not exist.")
    folder = path.parent if path.is_file() else denoiser_folder(path)
    if path.is_dir() and not (folder / "config.json").is_file():
        raise WadiInputError(f"{path} has no config.json (nor unet/ or transformer/ with one); it is not a diffusers model folder.")
    config_path = path if path.is_file() else folder / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise WadiInputError(f"{config_path} is not a model config.")
    return config


def model_from_config(config: Mapping[str, Any], *, device: str | torch.device = "meta") -> nn.Module:
    """Build the diffusers model a config describes (``_class_name``, default UNet2DConditionModel) on ``device``."""
    import diffusers

    class_name = config.get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise WadiInputError(f"the config names model class {class_name!r}, which is not a diffusers model class.")
    try:
        with torch.device(device):
            return cls.from_config(dict(config))
    except (TypeError, ValueError) as exc:
        raise WadiInputError(f"cannot build {class_name} from this config ({exc}).") from None


def load_model_config_only(path: str | Path) -> nn.Module:
    """A meta-device model (shapes, no weights) from a config.json folder or a pipeline root."""
    return model_from_config(read_model_config(path))


def load_planning_model(spec: str | Path) -> nn.Module:
    """The model a plan is made for: ``builtin:<name>`` or a digits-teacher folder (small, loaded for real),
    else a diffusers model folder / pipeline root built config-only on the meta device."""
    from wadi_distill.builtin.digits import model as models

    if isinstance(spec, str) and spec.startswith(models.BUILTIN_PREFIX):
        return models.load_digits(spec).unet
    path = Path(spec).expanduser()
    if path.is_dir() and (path / models.TEACHER_CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        return models.load_teacher_dir(path).unet
    return load_model_config_only(path)
