"""A tiny planted teacher/student pair and the real report `wadi_probe.compare` makes of it, for the plot tests."""

from __future__ import annotations

import copy
import functools

import torch

from wadi_probe import compare
from wadi_probe.rotation import as_matrix, rotate_pairs

LAYER_SPECS = [
    # name, shape, block, layer_type, kind
    ("down_blocks.0.resnets.0.conv1.weight", (8, 4, 3, 3), "down.0", "resnet conv", "conv"),
    ("down_blocks.0.attentions.0.to_q.weight", (16, 16), "down.0", "attention", "linear"),
    ("down_blocks.0.attentions.0.to_q.bias", (16,), "down.0", "attention", "bias"),
    ("down_blocks.0.attentions.0.ff.net.2.weight", (16, 32), "down.0", "feed-forward", "linear"),
    ("mid_block.attentions.0.to_k.weight", (16, 16), "mid", "attention", "linear"),
    ("up_blocks.0.attentions.0.to_v.weight", (12, 16), "up.0", "attention", "linear"),
    ("up_blocks.0.resnets.0.conv2.weight", (8, 8, 3, 3), "up.0", "resnet conv", "conv"),
]


def planted_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Teacher and student tensors: student = rank-2 pair rotation of the teacher, rows rescaled by ≤ 1 %."""
    gen = torch.Generator().manual_seed(seed)
    teacher, student = {}, {}
    for name, shape, *_ in LAYER_SPECS:
        t = torch.randn(shape, generator=gen)
        teacher[name] = t
        if len(shape) == 1:
            student[name] = t * 1.01
            continue
        m = as_matrix(t)
        theta = 0.05 * torch.randn(m.shape[0], 2, generator=gen) @ torch.randn(2, m.shape[1] // 2, generator=gen)
        scale = 1 + 0.01 * torch.rand(m.shape[0], 1, generator=gen)
        student[name] = (rotate_pairs(m, theta) * scale).reshape(shape)
    return teacher, student


def planted_report(seed: int = 0, *, spectra: bool = True) -> dict:
    """The report dict `wadi_probe.compare` produces for :func:`planted_pair` (``spectra=False``: the fast mode).

    Computed once per setting and handed out as a fresh copy, so a test may modify it.
    """
    return copy.deepcopy(_cached_report(seed, spectra))


@functools.lru_cache(maxsize=None)
def _cached_report(seed: int, spectra: bool) -> dict:
    teacher, student = planted_pair(seed)
    return compare(teacher, student, device="cpu", spectra=spectra).data
