"""A tiny TorchScript feature network and folders of random images, for the tests of `evaluate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class TinyFeatures(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 6): a random conv, pooled (resizes to 32 itself, like a real extractor)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 255.0, size=(32, 32), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3)) * 10


def save_tiny_features(path: Path, seed: int = 0) -> torch.jit.ScriptModule:
    """:class:`TinyFeatures` with weights from ``seed``, scripted and saved at ``path`` (what ``--features`` reads)."""
    torch.manual_seed(seed)
    scripted = torch.jit.script(TinyFeatures().eval())
    scripted.save(str(path))
    return scripted


def image_folder(path: Path, count: int, seed: int, shift: float = 0.0, size=(40, 30), suffix: str = ".png") -> Path:
    """``count`` random images of ``size`` (a colour per image plus noise, brighter by ``shift``) in ``path``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.uniform(0, 1, size=3) * 255 * (1 - shift) + shift * 255
        pixels = np.clip(base[None, None] + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}{suffix}")
    return path
