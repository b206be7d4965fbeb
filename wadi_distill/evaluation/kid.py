"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel.

``k(x, y) = (xᵀy / d + 1)³``, the kernel of the original code, torch-fidelity and torchmetrics, averaged over
``subsets`` random subsets of ``subset_size`` samples from each set (drawn with a seeded generator, so a rerun
gives the same value). Unlike FID it is unbiased in the sample size and 0 in expectation for two samples of one
distribution (so it can come out slightly negative). Written here (a few lines) because both libraries' KID
modules import their image-dataset code, and with it torchvision, on load; the formula is theirs.
"""

from __future__ import annotations

import numpy as np
import torch

from wadi_probe.errors import WadiInputError

__all__ = ["polynomial_mmd2", "kernel_inception_distance"]


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of two equal-size samples (m, d) under ``k(a, b) = (a·b / d + 1)³``, in fp64."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m = x.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_inception_distance(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """(mean, std over subsets, subset size used) of the polynomial-kernel MMD² between two feature sets (N, D)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real_t.shape[1:] != fake_t.shape[1:]:
        raise WadiInputError(f"feature sets have different widths ({real_t.shape[1]} vs {fake_t.shape[1]}).")
    size = min(int(subset_size), len(real_t), len(fake_t))
    if size < 2:
        raise WadiInputError("KID needs at least two samples in each set.")
    generator = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(max(1, int(subsets))):
        r = real_t[torch.randperm(len(real_t), generator=generator)[:size]]
        f = fake_t[torch.randperm(len(fake_t), generator=generator)[:size]]
        values.append(polynomial_mmd2(r, f))
    array = np.asarray(values)
    return float(array.mean()), float(array.std()), size
