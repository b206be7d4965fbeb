"""The pairwise rotation of weight directions that LoRaD uses, as pure tensor math (docs/design.md, "LoRaD").

A weight is viewed as a matrix (out, fan_in); a conv kernel (out, in, kh, kw) flattens to (out, in·kh·kw).
Input columns are paired (2j, 2j+1); row i, pair j is turned by the angle θ_ij. An odd fan-in leaves its last
column unrotated. Every row keeps its norm exactly, and Θ = 0 is the identity.

The probe uses :func:`pair_angles` to recover Θ from a teacher/student pair; LoRaD layers (training forward
and merge), export and the adapter readers all form an adapter's weight through :func:`merged_weight`, the one
place the merge formula is written. When Θ needs a gradient and the base weight does not (training on a frozen
base), :func:`merged_weight` differentiates the rotation by hand (:class:`_RotateFrozenWeight`): the backward
keeps only the rotated weight instead of autograd's cos, sin and stacked copies. (The LoRaD layers' training
forward keeps not even that: it forms the weight again in its backward and runs this backward there.)
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
    function is differentiable in both arguments; without a graph to record it writes into one preallocated
    tensor (:func:`_rotated_into`), with the same per-element arithmetic and so the same bits.
    """
    out, fan_in = weight.shape
    pairs = num_pairs(fan_in)
    _check_angles(weight, theta)
    compute_dtype = torch.promote_types(weight.dtype, theta.dtype)
    if not (torch.is_grad_enabled() and (weight.requires_grad or theta.requires_grad)):
        return _rotated_into(weight, theta, compute_dtype).to(weight.dtype)
    w = weight.to(compute_dtype)
    t = theta.to(compute_dtype)
    even = w[:, 0 : 2 * pairs : 2]
    odd = w[:, 1 : 2 * pairs : 2]
    cos, sin = torch.cos(t), torch.sin(t)
    rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1).reshape(out, 2 * pairs)
    if fan_in > 2 * pairs:
        rotated = torch.cat((rotated, w[:, 2 * pairs :]), dim=1)
    return rotated.to(weight.dtype)


def _check_angles(weight: torch.Tensor, theta: torch.Tensor) -> None:
    """Refuse angles whose shape is not (out, fan_in // 2) for an (out, fan_in) weight."""
    out, fan_in = weight.shape
    if theta.shape != (out, num_pairs(fan_in)):
        raise ValueError(f"theta must have shape {(out, num_pairs(fan_in))} for a weight of shape {(out, fan_in)}, "
                         f"got {tuple(theta.shape)}")


def _rotated_into(weight: torch.Tensor, theta: torch.Tensor, dtype: torch.dtype, *, scratch: bool = False) -> torch.Tensor:
    """R_Θ(W) in ``dtype`` (no graph), each half written straight into one (out, fan_in) result.

    The same operations as :func:`rotate_pairs`' formula, element for element (cos·w_2j − sin·w_2j+1 and
    sin·w_2j + cos·w_2j+1, each product rounded, then the difference or sum), so the bits are the same; what goes
    is the stack, the interleaving copy, the concatenation of an odd fan-in's last column, the four products'
    own tensors (the last two are taken in place in cos and sin): one weight-sized result besides cos and sin
    (and a narrower weight's even and odd columns in ``dtype``), where most of the time went to allocating and
    first touching fresh tensors. ``theta`` has the shape :func:`rotate_pairs` asks for; ``scratch=True`` says the
    caller no longer needs it, and sin is then taken in its place.
    """
    _check_angles(weight, theta)
    out, fan_in = weight.shape
    pairs = num_pairs(fan_in)
    t = theta.to(dtype)
    cos = torch.cos(t)
    sin = t.sin_() if scratch or t is not theta else torch.sin(t)  # in place where the angles are not the caller's
    # a narrower weight's columns widened once each (exactly): mixed-dtype products would widen them per product
    even = weight[:, 0 : 2 * pairs : 2].to(dtype)
    odd = weight[:, 1 : 2 * pairs : 2].to(dtype)
    rotated = torch.empty((out, fan_in), dtype=dtype, device=weight.device)
    halves = rotated[:, : 2 * pairs].unflatten(1, (pairs, 2))
    first, second = halves[..., 0], halves[..., 1]
    torch.mul(cos, even, out=first)
    torch.mul(sin, even, out=second)
    first.sub_(sin.mul_(odd))  # cos and sin are used up in place by their last products
    second.add_(cos.mul_(odd))
    if fan_in > 2 * pairs:
        rotated[:, 2 * pairs :] = weight[:, 2 * pairs :]
    return rotated


class _RotateFrozenWeight(torch.autograd.Function):
    """R_Θ(W) for a frozen W with a hand-written backward (the forward is :func:`rotate_pairs`).

    d w'_{2j}/dθ = −w'_{2j+1} and d w'_{2j+1}/dθ = w'_{2j}, so dL/dθ = g_{2j+1}·w'_{2j} − g_{2j}·w'_{2j+1}: two
    products on the rotated weight, instead of autograd replaying cos/sin/stack backwards and keeping their
    intermediates. The rotated weight, the result, is in the compute dtype (fp32 for fp16/bf16 weights) and kept
    for that.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        compute = torch.promote_types(weight.dtype, theta.dtype)
        rotated = _rotated_into(weight, theta, compute)  # a narrower weight is not copied in fp32 first
        ctx.save_for_backward(rotated)
        ctx.theta_dtype = theta.dtype
        return rotated

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (rotated,) = ctx.saved_tensors
        pairs = rotated.shape[1] // 2
        g = grad.to(rotated.dtype)
        grad_theta = g[:, 1 : 2 * pairs : 2] * rotated[:, 0 : 2 * pairs : 2]
        grad_theta.sub_(g[:, 0 : 2 * pairs : 2] * rotated[:, 1 : 2 * pairs : 2])  # the difference in place
        return None, grad_theta.to(ctx.theta_dtype)


_FUSED_BACKWARD = True


def set_fused_rotation_backward(enabled: bool) -> bool:
    """Use the hand-written rotation backward in :func:`merged_weight` (default on); returns the previous setting.

    Off, autograd differentiates :func:`rotate_pairs` directly (same values, more kernels and memory); the
    benchmarks use this to separate the two effects.
    """
    global _FUSED_BACKWARD
    previous, _FUSED_BACKWARD = _FUSED_BACKWARD, bool(enabled)
    return previous


def _rotate_for_grad(weight: torch.Tensor, theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`rotate_pairs` in ``dtype`` (at least ``theta``'s), through the hand-written backward when only Θ needs
    a gradient; without a graph to record, a narrower weight is not copied in ``dtype`` first and ``theta`` (the
    caller's own Θ = A·B, used for nothing else) is overwritten."""
    if not (torch.is_grad_enabled() and (weight.requires_grad or theta.requires_grad)):
        return _rotated_into(weight, theta, dtype, scratch=True)
    if _FUSED_BACKWARD and theta.requires_grad and not weight.requires_grad:
        return _RotateFrozenWeight.apply(weight, theta)
    return rotate_pairs(weight.to(dtype), theta)


def lorad_theta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Θ = A·B of a LoRaD adapter (A (out, r), B (r, fan_in // 2)), in fp32 or wider whatever the factors' dtype."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(a.device, dtype)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, kind: str = "lorad",
                  scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight an adapter gives, in ``weight``'s shape and in ``dtype`` (default: ``weight``'s dtype).

    ``kind="lorad"``: R_Θ(W) with Θ = A·B (:func:`lorad_theta`), A (out, r) and B (r, fan_in // 2).
    ``kind="lora"``: W + scale·B·A with A the down factor (r, fan_in) and B the up factor (out, r); conv factors
    (kohya's 4-D kernels) are flattened to matrices. Either way the arithmetic runs in fp32 or wider, so a small
    update on an fp16 base is not rounded away before the final cast. Differentiable in the factors (training).
    """
    matrix = as_matrix(weight)
    factors_dtype = torch.promote_types(a.dtype, b.dtype)
    compute = torch.promote_types(torch.promote_types(matrix.dtype, factors_dtype), torch.float32)
    if kind == "lorad":
        theta = lorad_theta(a.to(matrix.device), b.to(matrix.device))
        adapted = _rotate_for_grad(matrix, theta.to(compute), compute)
    elif kind == "lora":
        down = a.to(matrix.device, compute).reshape(a.shape[0], -1)
        up = b.to(matrix.device, compute).reshape(b.shape[0], -1)
        if up.shape[0] != matrix.shape[0] or down.shape[1] != matrix.shape[1] or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA factors {tuple(up.shape)}·{tuple(down.shape)} do not fit a weight {tuple(matrix.shape)}")
        adapted = matrix.to(compute) + scale * (up @ down)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; use 'lorad' or 'lora'")
    return adapted.reshape(weight.shape).to(dtype or weight.dtype)


def column_pairs(rows: torch.Tensor) -> torch.Tensor:
    """The column pairs (2j, 2j+1) of a real (out, fan_in) matrix as complex numbers (out, fan_in // 2).

    A view when the pairs lie contiguously (fp32/fp64, even fan-in, contiguous rows), else a copy; an odd
    fan-in's last column is left out. fp16/bf16 rows are widened to fp32 first.
    """
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.to(torch.float32)
    out, fan_in = rows.shape
    pairs = num_pairs(fan_in)
    paired = rows[:, : 2 * pairs].reshape(out, pairs, 2)
    if paired.stride(2) != 1 or paired.stride(1) != 2 or paired.stride(0) % 2:
        paired = paired.contiguous()
    return torch.view_as_complex(paired)


def pair_angles(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Recover the per-row, per-pair angles Θ that turn the teacher's column pairs towards the student's.

    For teacher pair (a, b) and student pair (a', b'): θ = atan2(a·b' − b·a', a·a' + b·b'), the argument of
    conj(a + ib)·(a' + ib'), and 0 wherever that product is zero (either pair is zero). Both inputs are
    (out, fan_in); the result is (out, fan_in // 2), in the inputs' (promoted) floating dtype, at least fp32.
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher and student shapes differ: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
    product = column_pairs(student.to(dtype)) * column_pairs(teacher.to(dtype)).conj()
    return pair_product_angles(product)


def pair_product_angles(product: torch.Tensor) -> torch.Tensor:
    """θ = arg(product) for the complex products conj(teacher pair)·(student pair); 0 where a product is 0.

    (The sign of a zero would otherwise turn arg(−0 + 0i) into π.)
    """
    return torch.angle(product).masked_fill_(product == 0, 0.0)
