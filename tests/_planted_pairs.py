"""Teacher/student pairs with planted, exactly known changes, for the probe's known-answer tests.

``planted_unet_pair`` takes a tiny UNet's state dict and, per weight matrix, either rescales its rows (norm
change known exactly, direction unchanged), rotates it by a rank-r LoRaD pair-angle field with balanced singular
values (norm unchanged, lorad rank = r), or leaves it untouched (bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from wadi_probe.rotation import rotate_pairs


def balanced_low_rank_angles(out: int, pairs: int, rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Θ = U·diag(σ)·Vᵀ with orthonormal U, V and σ_k = scale·(1 − 0.1k): exactly rank ``rank``, every
    component holding well over 1 % of the energy."""
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(pairs, rank, generator=gen, dtype=torch.float64))
    sigma = scale * (1 - 0.1 * torch.arange(rank, dtype=torch.float64))
    return (u * sigma) @ v.T


def row_angles_deg(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-row angles in degrees, in fp64 by the textbook formula arccos(cos)."""
    t = teacher.reshape(teacher.shape[0], -1).double()
    s = student.reshape(student.shape[0], -1).double()
    cos = (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


@dataclass
class PlantedPair:
    teacher: dict[str, torch.Tensor]
    student: dict[str, torch.Tensor]
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> per-row scale factors
    rotated: dict[str, int] = field(default_factory=dict)  # name -> planted rank
    untouched: list[str] = field(default_factory=list)


def planted_unet_pair(state: dict[str, torch.Tensor], *, rank: int = 2, seed: int = 0) -> PlantedPair:
    """Plant per-row rescales, rank-``rank`` rotations and untouched tensors in turn over the weight matrices.

    Matrices with fewer than ``rank + 1`` rows or pairs are left untouched (their rank could not show); 1-D
    tensors are rescaled as a whole on every other one.
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = {k: v.detach().clone().contiguous() for k, v in state.items()}
    pair = PlantedPair(teacher=teacher, student={})
    matrix_index = 0
    for vector_index, (name, t) in enumerate(teacher.items()):
        if t.ndim < 2:
            if vector_index % 2 == 0 and t.abs().sum() > 0:
                pair.student[name] = t * 1.25
                pair.scaled[name] = torch.tensor([1.25])
            else:
                pair.student[name] = t.clone()
                pair.untouched.append(name)
            continue
        rows = t.reshape(t.shape[0], -1)
        out, fan_in = rows.shape
        recipe = matrix_index % 3
        matrix_index += 1
        if recipe == 0 and (rows.norm(dim=1) > 0).all():
            scale = 1 + 0.2 * torch.rand(out, 1, generator=gen) - 0.1
            pair.student[name] = (rows * scale).reshape(t.shape)
            pair.scaled[name] = scale.flatten()
        elif recipe == 1 and min(out, fan_in // 2) > rank:
            theta = balanced_low_rank_angles(out, fan_in // 2, rank, scale=2.0, gen=gen)
            pair.student[name] = rotate_pairs(rows.double(), theta).float().reshape(t.shape)
            pair.rotated[name] = rank
        else:
            pair.student[name] = t.clone()
            pair.untouched.append(name)
    return pair


def expected_norm_change(scale: torch.Tensor) -> tuple[float, float]:
    """Mean and population std of |c − 1| for per-row scale factors c."""
    nc = (scale.double() - 1).abs()
    return float(nc.mean()), float(nc.std(correction=0)) if nc.numel() > 1 else 0.0


def degrees(radians: float) -> float:
    return math.degrees(radians)
