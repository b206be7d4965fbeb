"""What the probe's spectral numbers would be for a structureless change: the chance baselines.

A direction change with no structure at all — every row turned by the same small angle towards an independent,
uniformly random direction orthogonal to it — is not "rank 0" and not "unexplained": a random matrix already
keeps about 70 % of its energy in its top 30 % of singular values (the Marchenko–Pastur law), and a pairwise
rotation already reproduces the part of a random change that lies along each column pair's own circle, about
half. A layer's spectra say something about the student only by how far they exceed these numbers.

* :func:`chance_residual_energy` — the energy a structureless ΔD of shape (rows, fan_in) keeps at
  ``ceil(rank_fraction · min(rows, fan_in))``, cached per shape: for small layers a seeded Monte-Carlo estimate
  (mean and the spread of one draw), because the Marchenko–Pastur law is asymptotic and its finite-size error is
  a few tenths of a point there (0.7037 against 0.7016 for 128²); for layers at least 256 wide on the smaller
  side the Marchenko–Pastur closed form, which agrees with the Monte-Carlo estimate to 0.03 points at 1280² and
  320×2880, where Monte-Carlo draws would cost seconds per shape (measured: 552 s for SD1.5's 36 shapes).
* :func:`chance_rotation_explained` — the share of a structureless change a pairwise rotation explains:
  ``⌊fan_in/2⌋ / fan_in`` in closed form (half of each pair's change is along its circle; an odd fan-in's last
  column cannot be rotated), with the Monte-Carlo spread of one draw.

The estimates use their own seeded CPU generator, so they are the same in every process and on every device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from wadi_probe.rotation import column_pairs

__all__ = ["ABOVE_CHANCE_MARGIN", "Chance", "above_chance", "chance_for_shape", "chance_residual_energy",
           "chance_rotation_explained"]

#: An excess over chance smaller than this (2 percentage points), or than twice the spread of one draw of the
#: structureless change, is reported as "at chance".
ABOVE_CHANCE_MARGIN = 0.02

#: Monte-Carlo draws per shape: enough that the mean's error is far below the margin for small layers,
#: two for layers whose single draw already self-averages (the spread of one draw falls like 1/sqrt(rows·fan_in)).
_ELEMENTS_PER_SHAPE = 1 << 22
_MAX_DRAWS = 32
_SMALL_ANGLE = 1e-3  # radians; the shares are scale-free for small angles


@dataclass(frozen=True)
class Chance:
    """Chance baselines for one analysed shape: means and the spread (std) of a single structureless draw (None
    where the closed form is used), how many Monte-Carlo draws were made (0: closed form), and the mean
    cumulative energy curve of the structureless residual (``energy(k)``, k = 1..min(rows, fan_in))."""

    residual_energy: float | None
    residual_energy_std: float | None
    rotation_explained: float | None
    rotation_explained_std: float | None
    draws: int
    residual_curve: tuple[float, ...] = ()


def above_chance(excess: float | None, spread: float | None = None) -> bool:
    """True when ``excess`` (value − chance) is larger than :data:`ABOVE_CHANCE_MARGIN` and twice ``spread``."""
    if excess is None:
        return False
    return excess > max(ABOVE_CHANCE_MARGIN, 2 * (spread or 0.0))


def _seed(rows: int, fan_in: int) -> int:
    # Not Python's hash(): that changes with PYTHONHASHSEED, and the baseline must not.
    return (rows * 1_000_003 + fan_in * 7919 + 12345) % (2**63 - 1)


def _draws(rows: int, fan_in: int) -> int:
    # at least two, so that the spread of one draw is measured too
    return max(2, min(_MAX_DRAWS, math.ceil(_ELEMENTS_PER_SHAPE / max(1, rows * fan_in))))


def _structureless_pair(rows: int, fan_in: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit teacher rows and unit student rows turned by ``_SMALL_ANGLE`` towards a random orthogonal direction."""
    t = torch.randn(rows, fan_in, generator=gen, dtype=torch.float64)
    t /= t.norm(dim=1, keepdim=True)
    d = torch.randn(rows, fan_in, generator=gen, dtype=torch.float64)
    d -= (d * t).sum(1, keepdim=True) * t
    d /= d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = math.cos(_SMALL_ANGLE) * t + math.sin(_SMALL_ANGLE) * d
    return t, s


def _energy_curve(residual: torch.Tensor) -> torch.Tensor:
    """Cumulative energy share of the singular values, from the smaller Gram matrix's eigenvalues (fp64).

    (The same arithmetic as :func:`wadi_probe.decompose.energy_curve`, written out here so that this module, which
    the per-layer math uses, does not import it back.)"""
    gram = residual @ residual.mT if residual.shape[0] <= residual.shape[1] else residual.mT @ residual
    sigma_sq = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return (sigma_sq.cumsum(0) / sigma_sq.sum()).clamp_max(1.0)


def _explained(t: torch.Tensor, s: torch.Tensor) -> float:
    residual = float((s - t).square().sum())
    gap = column_pairs(s).abs() - column_pairs(t).abs()
    left = float(gap.square().sum())
    if t.shape[1] % 2:
        left += float((s[:, -1] - t[:, -1]).square().sum())
    return 1.0 - left / residual


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var) if len(values) > 1 else 0.0


#: Shapes at least this large on the smaller side, and with at least this many elements, use the closed form.
CLOSED_FORM_MIN_SIDE = 256
CLOSED_FORM_MIN_ELEMENTS = 1 << 16


def marchenko_pastur_curve(rows: int, fan_in: int, points: int = 200_001) -> list[float]:
    """``energy(k)`` for k = 1..min(rows, fan_in) of a large random matrix, from the Marchenko–Pastur law.

    The eigenvalues of the smaller Gram matrix of an i.i.d. matrix with aspect ratio y = min/max follow the MP
    density on [(1 − √y)², (1 + √y)²]; the top k of m eigenvalues hold the density's mass k/m from the top, and
    their share of the energy is the first moment over that range. Integrated numerically with x = centre +
    half-width·cos t, which removes the square-root singularities at the edges.
    """
    import numpy as np

    m = min(rows, fan_in)
    y = m / max(rows, fan_in)
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    t = np.linspace(0.0, math.pi, points)
    x = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(t)  # from the top edge down
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.sqrt(np.clip((hi - x) * (x - lo), 0.0, None)) / (2 * math.pi * y * x)
    weight = np.nan_to_num(density * (hi - lo) / 2 * np.sin(t), nan=0.0, posinf=0.0)
    step = np.diff(t)
    mass = np.concatenate(([0.0], np.cumsum((weight[1:] + weight[:-1]) / 2 * step)))
    moment = np.concatenate(([0.0], np.cumsum(((weight * x)[1:] + (weight * x)[:-1]) / 2 * step)))
    curve = np.interp(np.arange(1, m + 1) / m, mass / mass[-1], moment / moment[-1])
    return [float(v) for v in curve]


@functools.lru_cache(maxsize=4096)
def chance_for_shape(rows: int, fan_in: int, rank_fraction: float = 0.3) -> Chance:
    """Both baselines for a (rows, fan_in) direction change, estimated once per shape and process (cached).

    ``rows`` is the number of analysed rows (rows with zeros or NaN/Inf left out), ``fan_in`` the flattened
    input width. Shapes with a single row or column have no spectrum to compare: their energy baseline is 1.
    """
    rows, fan_in = int(rows), int(fan_in)
    if rows < 1 or fan_in < 2:
        return Chance(None, None, None, None, 0)
    k = max(1, math.ceil(rank_fraction * min(rows, fan_in)))
    if min(rows, fan_in) >= CLOSED_FORM_MIN_SIDE and rows * fan_in >= CLOSED_FORM_MIN_ELEMENTS:
        curve = marchenko_pastur_curve(rows, fan_in)
        # the spread of one draw of a layer this large is far below the margin (0.0006 at 1280²): not estimated
        return Chance(round(curve[k - 1], 6), None, chance_rotation_explained(fan_in), None, 0,
                      tuple(round(v, 6) for v in curve))
    gen = torch.Generator().manual_seed(_seed(rows, fan_in))
    energies, explained, curves = [], [], []
    for _ in range(_draws(rows, fan_in)):
        t, s = _structureless_pair(rows, fan_in, gen)
        curve = _energy_curve(s - t)
        curves.append(curve)
        energies.append(float(curve[k - 1]))
        explained.append(_explained(t, s))
    e_mean, e_std = _mean_std(energies)
    _, x_std = _mean_std(explained)
    mean_curve = tuple(round(v, 6) for v in torch.stack(curves).mean(0).tolist())
    # Rounded to 6 decimals (the estimate's own error is far larger): the last bits of a Gram product depend on the
    # thread count, and the baseline should read the same however many threads computed it.
    return Chance(round(e_mean, 6), round(e_std, 6), chance_rotation_explained(fan_in), round(x_std, 6), len(energies),
                  mean_curve)


def chance_residual_energy(rows: int, fan_in: int, rank_fraction: float = 0.3) -> float | None:
    """Energy share a structureless direction change of this shape keeps at ``rank_fraction`` of full rank."""
    return chance_for_shape(rows, fan_in, rank_fraction).residual_energy


def chance_rotation_explained(fan_in: int) -> float | None:
    """Share of a structureless direction change a pairwise rotation explains: ``⌊fan_in/2⌋ / fan_in``.

    For a small isotropic change, each column pair's change splits evenly (in expectation) between the pair's
    circle (which a rotation reproduces) and its radius (which it cannot); an odd fan-in's last column is
    never rotated.
    """
    fan_in = int(fan_in)
    if fan_in < 2:
        return None
    return (fan_in // 2) / fan_in
