"""Shared test fixtures: tiny SD-like UNets built from diffusers configs with random weights."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """Config of a tiny SD1-like UNet2DConditionModel (about 50k parameters, 8 px latents)."""
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    config.update(overrides)
    return config


def make_tiny_unet(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny UNet2DConditionModel with random (seeded) weights, biases and norms included."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(**overrides))
    with torch.no_grad():
        for parameter in unet.parameters():  # make norms/biases non-trivial so a mix-up would show
            parameter.add_(0.01 * torch.randn_like(parameter))
    return unet.eval()


@pytest.fixture
def tiny_unet() -> Callable[..., torch.nn.Module]:
    """Factory fixture: ``tiny_unet(seed=0, **config_overrides)`` -> UNet2DConditionModel."""
    return make_tiny_unet
