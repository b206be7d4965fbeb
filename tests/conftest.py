"""Shared test fixtures: tiny SD-like UNets built from diffusers configs with random weights."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import torch


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker, and every process its tests start, gets its share of the cores.

    torch's default, one thread per core in each of N workers, asks N times the machine, and OpenMP threads that
    wait by spinning then slow the heavy tests several fold. Measured on the 2-core VM, a fresh clone with the README's
    test command twice in a row, without and with this: 972 s and 826 s in all (teacher training test 117 s and
    under 14 s). An ``OMP_NUM_THREADS`` the user set is left alone.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the CLI runs, demos and checks the tests start
    torch.set_num_threads(threads)


_share_the_cores_between_workers()


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


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block, the previous count restored after it (also for module fixtures, which
    cannot use :func:`single_thread`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_thread():
    """Run a test with one torch thread (tiny models are fastest so on a shared CPU, and bit-identical resume of a
    killed subprocess needs the same thread count); the previous count is restored afterwards."""
    with one_torch_thread():
        yield


@pytest.fixture
def tiny_unet() -> Callable[..., torch.nn.Module]:
    """Factory fixture: ``tiny_unet(seed=0, **config_overrides)`` -> UNet2DConditionModel."""
    return make_tiny_unet


def to_ldm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict as an original LDM single file would hold it (plus VAE and text-encoder keys)."""
    from wadi_probe.io.ldm import diffusers_to_ldm_names

    names = diffusers_to_ldm_names(state)
    ldm = {f"model.diffusion_model.{names[k]}": v for k, v in state.items()}
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.ones(4, 4, 3, 3)
    ldm["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.ones(10, 16)
    return ldm


def write_every_layout(unet: torch.nn.Module, folder: Any) -> dict[str, Any]:
    """Write one UNet's weights in every layout the probe reads; returns {label: path}.

    Labels: safetensors, diffusers, diffusers-sharded (pipeline root), ldm-safetensors, ldm-ckpt (nested under
    ``state_dict``), torch-bin (``module.unet.`` prefixes). All hold bit-identical fp32 tensors.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    paths = {
        "safetensors": folder / "file.safetensors",
        "diffusers": folder / "folder",
        "diffusers-sharded": folder / "pipe",
        "ldm-safetensors": folder / "ldm.safetensors",
        "ldm-ckpt": folder / "ldm.ckpt",
        "torch-bin": folder / "plain.bin",
    }
    save_file(state, str(paths["safetensors"]))
    unet.save_pretrained(paths["diffusers"])
    unet.save_pretrained(paths["diffusers-sharded"] / "unet", max_shard_size="20KB")
    save_file(to_ldm_state(state), str(paths["ldm-safetensors"]))
    torch.save({"state_dict": to_ldm_state(state)}, paths["ldm-ckpt"])
    torch.save({f"module.unet.{k}": v for k, v in state.items()}, paths["torch-bin"])
    return paths


@pytest.fixture(scope="session")
def teacher_family(tmp_path_factory) -> dict[str, Any]:
    """Teachers as users have them (see tests/tiny_pipelines.py), built once per test session:

    ``legacy-sd15`` (SD1-like, the original SD1.5 ``config.json`` keys only: diffusers fills the rest in hash-seed
    order), ``sdxl-fp16-hub`` (SDXL-like, fp16-only files in a Hub cache snapshot of symbolic links),
    ``sd2-fp16`` (SD2-like v-prediction, fp16-only files in a plain folder) and ``prompts`` (a .txt prompt file).
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_pipelines import make_pipeline

    root = tmp_path_factory.mktemp("teacher-family")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\n")
    return {"root": root, "prompts": prompts,
            "legacy-sd15": make_pipeline(root / "legacy-sd15", "sd", legacy_config=True),
            "sdxl-fp16-hub": make_pipeline(root / "hub", "sdxl", variant="fp16", hub_snapshot=True),
            "sd2-fp16": make_pipeline(root / "sd2-fp16", "sd2", variant="fp16")}
