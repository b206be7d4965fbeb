"""LoRaD layers: low-rank rotation of weight direction, as wrappers around a frozen base layer.

A wrapped layer keeps its original ``nn.Linear`` / ``nn.Conv2d`` as ``base_layer`` (frozen) and any number of
named adapters; one of them (or none) is active. With adapter ``name`` active, a forward pass

1. forms Θ = A·B in fp32 (A is (out, r), B is (r, ⌊fan_in/2⌋)),
2. rotates every row's column pairs (2j, 2j+1) of the base weight by Θ once (:func:`wadi_probe.rotation.merged_weight`,
   the formula merge and export use too, with a hand-written backward for Θ),
3. runs ONE ``F.linear`` / conv call with that weight. The base layer's own forward is never run as well.

When that forward records a graph, it runs as one autograd function (``_AdaptedMatmul``) that keeps the input,
the two factors and a reference to the frozen base weight, not the adapted weight: backward forms the weight
again (step 1-2, the same call) and takes every gradient with the kernels autograd would run, so the values are
the same bit for bit and each adapted layer keeps one weight-sized tensor less (two under autocast) between
forward and backward. Passes under ``torch.no_grad`` (teacher and fake score's guided passes) are plain.

A conv kernel (out, in/groups, kh, kw) is flattened to (out, in/groups·kh·kw) for the pairing, exactly as the
probe measures it. With an odd fan-in the last column is left unrotated. Each row keeps its norm, Θ = 0 is the
identity, and A starts at zeros, so a fresh adapter reproduces the teacher exactly.

The same frozen base can carry several adapters, which is how VSD shares one copy of the teacher:
adapter ``None`` is the teacher, ``"student"`` the one-step generator, ``"fake"`` the fake score. A second
adapter kind, ``"lora"`` (W + scale·B·A, the usual additive low-rank update), lives in the same wrapper for the
fake-score option that uses plain LoRA.

Merging writes the adapted weight into the base layer through :func:`wadi_probe.rotation.merged_weight`, the
same function export and the probe's adapter reader call (a copy of the original is kept, so unmerging restores
it bit-for-bit). Injecting adapters into a whole model, switching, merging and unloading them live in
:mod:`wadi_distill.lorad.model`; the settings in :class:`wadi_distill.lorad.config.LoRaDConfig`.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wadi_distill.lorad.config import ADAPTER_KINDS, INITS
from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import lorad_theta, merged_weight, set_fused_rotation_backward

__all__ = [
    "AdapterSpec",
    "LoRaDLayer",
    "LoRaDLinear",
    "LoRaDConv2d",
    "set_fused_rotation_backward",
]

_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device_type`` when it is on (a no-op otherwise)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (TypeError, RuntimeError):  # device types without autocast (e.g. meta)
        pass
    return contextlib.nullcontext()


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter on one layer is: its kind, rank and (for LoRA) its scale."""

    kind: str
    rank: int
    scale: float = 1.0


def _adapted_weight(spec: AdapterSpec, source: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The weight adapter ``spec`` with factors ``a``, ``b`` gives on ``source`` (:func:`merged_weight`)."""
    if spec.kind == "lora":
        return merged_weight(source, a, b, kind="lora", scale=spec.scale)
    with _autocast_off(source.device.type):  # mixed precision must not turn the angles into fp16/bf16
        return merged_weight(source, a, b)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul operands to on ``device_type``, or None when it is off."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, RuntimeError):  # device types without autocast (e.g. meta)
        return None


def _autocast_cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as autocast hands it to a matmul: cast to ``dtype`` unless autocast is off or ``t`` is fp64."""
    if dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


class _AdaptedMatmul(torch.autograd.Function):
    """One adapted layer's forward that keeps nothing weight-sized for backward.

    Forward forms the adapter's weight (:func:`merged_weight`), runs the layer's matmul with it and drops it;
    it keeps the matmul's input (as autocast hands it over), the two factors and a reference to the frozen base
    weight. Backward forms the weight again, takes dL/dx and dL/dW with the kernels autograd would run for the
    matmul, and passes dL/dW back through :func:`merged_weight`'s own graph (with its hand-written rotation
    backward) to the factors. Gradients equal those of the plain graph bit for bit; the memory saved is the
    adapted weight, and under autocast its fp16/bf16 cast, per layer, for the price of forming it twice.
    """

    @staticmethod
    def forward(ctx, layer: LoRaDLayer, spec: AdapterSpec, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                source: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.spec, ctx.device_type = layer, spec, x.device.type
        ctx.autocast = _autocast_dtype(x.device.type)
        weight = _adapted_weight(spec, source, a, b)
        x_cast = _autocast_cast(x, ctx.autocast)
        out = layer._matmul(x_cast, _autocast_cast(weight, ctx.autocast))  # the bias is cast by autocast itself
        ctx.save_for_backward(x_cast, a, b, source)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_cast, a, b, source = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[2:5]
        # the forward's autocast state again (a LoRA update's matmul follows autocast; LoRaD angles never do)
        autocast = torch.autocast(ctx.device_type, dtype=ctx.autocast) if ctx.autocast else _autocast_off(ctx.device_type)
        with torch.enable_grad(), autocast:
            factors = (a.detach().requires_grad_(need_a), b.detach().requires_grad_(need_b))
            weight = _adapted_weight(ctx.spec, source, *factors)
        with _autocast_off(ctx.device_type):
            grad_x, grad_w = ctx.layer._matmul_backward(grad, x_cast, _autocast_cast(weight.detach(), ctx.autocast),
                                                        need_x)
        grad_a = grad_b = None
        wanted = [f for f, need in zip(factors, (need_a, need_b)) if need]
        if wanted:
            grads = iter(torch.autograd.grad(weight, wanted, grad_w.to(weight.dtype)))
            grad_a = next(grads) if need_a else None
            grad_b = next(grads) if need_b else None
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return None, None, grad_x, grad_a, grad_b, None


class LoRaDLayer(nn.Module):
    """Common machinery of :class:`LoRaDLinear` and :class:`LoRaDConv2d` (a frozen base plus named adapters).

    Parameters live in ``lorad_A.<name>`` (out, r) and ``lorad_B.<name>`` (r, ⌊fan_in/2⌋) for LoRaD adapters,
    and in ``lora_A.<name>`` (r, fan_in) / ``lora_B.<name>`` (out, r) for LoRA adapters.
    """

    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if getattr(base_layer, "weight", None) is None or base_layer.weight.ndim < 2:
            raise WadiInputError(f"cannot wrap {type(base_layer).__name__}: it has no weight matrix.")
        self.base_layer = base_layer
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lorad_A = nn.ParameterDict()
        self.lorad_B = nn.ParameterDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._original_weight: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------- shapes
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight as stored (e.g. (out, in, kh, kw) for a conv)."""
        return tuple(self.base_layer.weight.shape)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Columns of the weight viewed as a matrix (in·kh·kw for a conv kernel)."""
        return int(self.base_layer.weight[0].numel())

    @property
    def adapters(self) -> dict[str, AdapterSpec]:
        """The adapters on this layer, by name."""
        return dict(self.specs)

    # --------------------------------------------------------------------------------------------- adapters
    def add_adapter(
        self,
        name: str,
        rank: int,
        *,
        kind: str = "lorad",
        init: str = "zeros_xavier",
        dtype: torch.dtype = torch.float32,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add adapter ``name`` of ``kind`` ("lorad" or "lora") and rank ``rank``; parameters on the base's device.

        ``init="zeros_xavier"`` (the paper's): LoRaD A = 0, B Xavier-uniform; LoRA B = 0, A Kaiming-uniform.
        ``init="random"`` makes both factors random (small), useful for tests and debugging only.
        """
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
            raise WadiInputError(f"adapter name {name!r} must be a plain identifier (letters, digits, '_' or '-').")
        if name in self.specs:
            raise WadiInputError(f"this layer already has an adapter called {name!r}.")
        if kind not in ADAPTER_KINDS:
            raise WadiInputError(f"unknown adapter kind {kind!r}; use one of {', '.join(ADAPTER_KINDS)}.")
        if init not in INITS:
            raise WadiInputError(f"unknown init {init!r}; use one of {', '.join(INITS)}.")
        if int(rank) < 1:
            raise WadiInputError(f"the rank of adapter {name!r} must be at least 1, got {rank}.")
        rank = int(rank)
        device = self.base_layer.weight.device
        out, fan_in = self.out_features, self.fan_in
        if kind == "lorad":
            pairs = fan_in // 2
            if pairs == 0:
                raise WadiInputError("LoRaD needs a fan-in of at least 2 to have a column pair to rotate.")
            a = torch.empty(out, rank, device=device, dtype=dtype)
            b = torch.empty(rank, pairs, device=device, dtype=dtype)
            nn.init.xavier_uniform_(b, generator=generator)
            if init == "zeros_xavier":
                nn.init.zeros_(a)
            else:
                nn.init.normal_(a, std=0.1 / math.sqrt(rank), generator=generator)
            self.lorad_A[name] = nn.Parameter(a)
            self.lorad_B[name] = nn.Parameter(b)
        else:
            a = torch.empty(rank, fan_in, device=device, dtype=dtype)
            b = torch.empty(out, rank, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            if init == "zeros_xavier":
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.1 / math.sqrt(rank), generator=generator)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = AdapterSpec(kind=kind, rank=rank, scale=float(scale))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        self._require(name)
        if self.merged_adapter == name:
            self.unmerge()
        for store in (self.lorad_A, self.lorad_B, self.lora_A, self.lora_B):
            if name in store:
                del store[name]
        del self.specs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter used by forward; ``None`` means the plain base layer."""
        if name is not None:
            self._require(name)
        self.active_adapter = name

    def _require(self, name: str) -> None:
        if name not in self.specs:
            raise WadiInputError(f"this layer has no adapter called {name!r} (it has: {', '.join(self.specs) or 'none'}).")

    # ------------------------------------------------------------------------------------------------- math
    def _source_weight(self) -> torch.Tensor:
        """The unadapted base weight (the kept original while an adapter is merged)."""
        return self._original_weight if self._original_weight is not None else self.base_layer.weight

    def theta(self, name: str | None = None) -> torch.Tensor:
        """Θ = A·B of LoRaD adapter ``name`` (default: the active one), (out, ⌊fan_in/2⌋) in fp32 or wider."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise WadiInputError("no adapter is active, so there is no Θ to form.")
        self._require(name)
        if self.specs[name].kind != "lorad":
            raise WadiInputError(f"adapter {name!r} is a LoRA adapter; only LoRaD adapters have rotation angles.")
        a, b = self.lorad_A[name], self.lorad_B[name]
        with _autocast_off(a.device.type):  # mixed precision must not turn the angles into fp16/bf16
            return lorad_theta(a, b)

    def effective_weight(self, name: str | None = None) -> torch.Tensor:
        """The weight adapter ``name`` (default: the active one) gives, in the base weight's shape and dtype."""
        name = self.active_adapter if name is None else name
        source = self._source_weight()
        if name is None:
            return source
        self._require(name)
        return _adapted_weight(self.specs[name], source, *self._factors(name))

    def _factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """Adapter ``name``'s two factors in :func:`merged_weight`'s order: (A, B) for LoRaD, (down, up) for LoRA."""
        if self.specs[name].kind == "lora":
            return self.lora_A[name], self.lora_B[name]
        return self.lorad_A[name], self.lorad_B[name]

    def _forward_weight(self) -> torch.Tensor:
        name = self.active_adapter
        if self.merged_adapter is not None and name == self.merged_adapter:
            return self.base_layer.weight  # the merged weight is already in place
        return self.effective_weight(name)

    def _records(self, x: torch.Tensor) -> bool:
        """Whether this forward records a graph through an unmerged adapter that :class:`_AdaptedMatmul` handles."""
        name = self.active_adapter
        if name is None or name == self.merged_adapter or not torch.is_grad_enabled() or not self._recomputes(x):
            return False
        return x.requires_grad or any(f.requires_grad for f in self._factors(name))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output: through :class:`_AdaptedMatmul` when a graph is recorded through an unmerged adapter
        (nothing weight-sized kept for backward), else the matmul with :meth:`_forward_weight` (no-grad passes,
        the plain base, a merged adapter, a base that itself trains: nothing added to those)."""
        if self._records(x):
            name = self.active_adapter
            return _AdaptedMatmul.apply(self, self.specs[name], x, *self._factors(name), self._source_weight())
        return self._matmul(x, self._forward_weight())

    def _recomputes(self, x: torch.Tensor) -> bool:
        """Whether :class:`_AdaptedMatmul` handles this input (and a frozen base: no weight or bias gradient)."""
        return not any(p.requires_grad for p in self.base_layer.parameters())

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` in place of its own (and its own bias)."""
        raise NotImplementedError

    def _matmul_backward(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(dL/dx or None, dL/dweight) of :meth:`_matmul`, with the same kernels autograd would run."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Write adapter ``name``'s (default: the active one's) weight into the base layer; keep the original."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise WadiInputError("no adapter named and none active: nothing to merge.")
        self._require(name)
        if self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        with _autocast_off(self.base_layer.weight.device.type):
            merged = self.effective_weight(name)
        self._original_weight = self.base_layer.weight.detach().clone()
        self.base_layer.weight.copy_(merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original base weight back, bit-for-bit (no-op when nothing is merged)."""
        if self._original_weight is None:
            return
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapter = None

    def _apply(self, fn, recurse: bool = True):  # keep the kept original on the same device/dtype as the base
        result = super()._apply(fn, recurse)
        if self._original_weight is not None:
            self._original_weight = fn(self._original_weight)
        return result

    def extra_repr(self) -> str:
        parts = [f"{n}: {s.kind} r={s.rank}" for n, s in self.specs.items()]
        return f"adapters=[{', '.join(parts)}], active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class LoRaDLinear(LoRaDLayer):
    """An ``nn.Linear`` with named LoRaD/LoRA adapters; forward = one ``F.linear`` with the adapted weight."""

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise WadiInputError(f"LoRaDLinear wraps nn.Linear, got {type(base_layer).__name__}.")
        super().__init__(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim > 2 and self._records(x):  # tokens as rows, as F.linear folds them itself: the same kernels
            rows = self._forward(x.reshape(-1, x.shape[-1]))
            return rows.view(*x.shape[:-1], rows.shape[-1])
        return self._forward(x)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _recomputes(self, x: torch.Tensor) -> bool:
        return x.ndim >= 2 and super()._recomputes(x)

    def _matmul_backward(self, grad, x, weight, need_x):  # autograd's mm backward of x·Wᵀ (x as rows)
        return (grad.mm(weight) if need_x else None), grad.t().mm(x)


class LoRaDConv2d(LoRaDLayer):
    """An ``nn.Conv2d`` with named LoRaD/LoRA adapters; the kernel is flattened to in/groups·kh·kw for pairing."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise WadiInputError(f"LoRaDConv2d wraps nn.Conv2d, got {type(base_layer).__name__}.")
        super().__init__(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # _conv_forward honours stride, padding (including non-zero padding modes), dilation and groups.
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def _recomputes(self, x: torch.Tensor) -> bool:
        # the backward below is aten's convolution backward, so the forward must be one plain convolution call
        conv = self.base_layer
        return x.ndim == 4 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and super()._recomputes(x)

    def _matmul_backward(self, grad, x, weight, need_x):  # the backward autograd runs for aten.convolution
        conv = self.base_layer
        bias_sizes = None if conv.bias is None else list(conv.bias.shape)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
            conv.groups, [need_x, True, False])
        return grad_x, grad_w
