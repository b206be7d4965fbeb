"""Which device to compute on: the one rule both command lines and the library functions use."""

from __future__ import annotations

import re

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; a CUDA request without a GPU is an input error.

    Accepts ``cpu``, ``cuda``, ``cuda:N``, ``auto``, a :class:`torch.device` or the command lines'
    :class:`wadi_probe.console.Device` choice.
    """
    if isinstance(device, torch.device):
        return device
    text = str(getattr(device, "value", device)).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise WadiInputError(f"unknown device {device!r}; use auto, cpu or cuda (cuda:N).")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise WadiInputError(f"device {text!r} was requested but CUDA is not available on this machine.")
    return torch.device(text)
