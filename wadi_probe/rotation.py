"""The pairwise rotation of weight directions that LoRaD uses (DESIGN §4–§5), as pure tensor math.

A weight is viewed as a matrix (out, fan_in); a conv kernel (out, in, kh, kw) flattens to (out, in·kh·kw).
Input columns are paired (2j, 2j+1); row i, pair j is turned by the angle θ_ij. An odd fan-in leaves its last
column unrotated. Every row keeps its norm exactly, and Θ = 0 is the identity.

The probe uses :func:`pair_angles` to recover Θ from a teacher/student pair; LoRaD and the adapter readers use
:func:`rotate_pairs` to apply one.
"""

from __future__ import annotations

import torch


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as (out, fan_in): rows are output units, conv kernels are flattened per output channel."""
    if weight.ndim < 2:
        raise ValueError(f"a weight matrix needs 2 or more dimensions, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def num_pairs(fan_in: int) -> int:
    """Number of rotated column pairs for a fan-in (the last column of an odd fan-in is left alone)."""
    return fan_in // 2


def rotate_pairs(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Return R_Θ(W): row i, column pair (2j, 2j+1) rotated by ``theta[i, j]`` (radians).

    ``weight`` is (out, fan_in); ``theta`` is (out, fan_in // 2). The arithmetic runs in the wider of the two
    dtypes (so fp16/bf16 weights are rotated by fp32 angles) and the result has the weight's dtype. The
    function is differentiable in both arguments.
    """
    out, fan_in = weight.shape
    pairs = num_pairs(fan_in)
    if theta.shape != (out, pairs):
        raise ValueError(f"theta must have shape {(out, pairs)} for a weight of shape {(out, fan_in)}, got {tuple(theta.shape)}")
    compute_dtype = torch.promote_types(weight.dtype, theta.dtype)
    w = weight.to(compute_dtype)
    t = theta.to(compute_dtype)
    even = w[:, 0 : 2 * pairs : 2]
    odd = w[:, 1 : 2 * pairs : 2]
    cos, sin = torch.cos(t), torch.sin(t)
    rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).reshape(out, 2 * pairs)
    if fan_in > 2 * pairs:
        rotated = torch.cat((rotated, w[:, 2 * pairs :]), dim=1)
    return rotated.to(weight.dtype)


def pair_angles(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Recover the per-row, per-pair angles Θ that turn the teacher's column pairs towards the student's.

    For teacher pair (a, b) and student pair (a', b'): θ = atan2(a·b' − b·a', a·a' + b·b'), and 0 wherever
    either pair is exactly zero. Both inputs are (out, fan_in); the result is (out, fan_in // 2), in the
    inputs' (promoted) floating dtype.
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher and student shapes differ: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
    t = teacher.to(dtype)
    s = student.to(dtype)
    pairs = num_pairs(t.shape[1])
    a, b = t[:, 0 : 2 * pairs : 2], t[:, 1 : 2 * pairs : 2]
    a2, b2 = s[:, 0 : 2 * pairs : 2], s[:, 1 : 2 * pairs : 2]
    theta = torch.atan2(a * b2 - b * a2, a * a2 + b * b2)
    zero = ((a == 0) & (b == 0)) | ((a2 == 0) & (b2 == 0))
    return theta.masked_fill(zero, 0.0)
