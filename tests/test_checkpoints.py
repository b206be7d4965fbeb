"""Checkpoint readers: every layout gives the same names and bit-identical tensors; bad inputs get one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_unet
from wadi_probe.checkpoints import open_checkpoint, write_like
from wadi_probe.errors import WadiInputError


@pytest.fixture(scope="module")
def unet_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in make_tiny_unet(seed=1).state_dict().items()}


def assert_same_tensors(checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.names()) == sorted(state)
    for name, expected in state.items():
        assert checkpoint.shape(name) == tuple(expected.shape)
        assert checkpoint.dtype(name) == expected.dtype
        got = checkpoint.tensor(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_single_safetensors_file(tmp_path: Path, unet_state) -> None:
    path = tmp_path / "unet.safetensors"
    save_file(unet_state, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.layout == "safetensors"
        assert_same_tensors(ckpt, unet_state)
        name = "down_blocks.0.attentions.0.proj_in.weight"
        assert ckpt.source_key(name) == name


def test_diffusers_folder_model_and_pipeline_root(tmp_path: Path, tiny_unet) -> None:
    unet = tiny_unet(seed=2)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    state = unet.state_dict()
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        with open_checkpoint(path) as ckpt:
            assert ckpt.layout == "diffusers"
            assert_same_tensors(ckpt, state)
