"""LoRaD layers: low-rank rotation of weight direction (DESIGN §5), as wrappers around a frozen base layer.

A wrapped layer keeps its original ``nn.Linear`` / ``nn.Conv2d`` as ``base_layer`` (frozen) and any number of
named adapters; one of them (or none) is active. With adapter ``name`` active, a forward pass

1. forms Θ = A·B in fp32 (A is (out, r), B is (r, ⌊fan_in/2⌋)),
2. rotates every row's column pairs (2j, 2j+1) of the base weight by Θ once (:func:`wadi_probe.rotation.rotate_pairs`),
3. runs ONE ``F.linear`` / conv call with that weight. The base layer's own forward is never run as well.

A conv kernel (out, in/groups, kh, kw) is flattened to (out, in/groups·kh·kw) for the pairing, exactly as the
probe measures it. With an odd fan-in the last column is left unrotated. Each row keeps its norm, Θ = 0 is the
identity, and A starts at zeros, so a fresh adapter reproduces the teacher exactly.

The same frozen base can carry several adapters, which is how VSD shares one copy of the teacher:
adapter ``None`` is the teacher, ``"student"`` the one-step generator, ``"fake"`` the fake score. A second
adapter kind, ``"lora"`` (W + scale·B·A, the usual additive low-rank update), lives in the same wrapper for the
fake-score option that uses plain LoRA.

Merging writes R_Θ(W) into the base weight (a copy of the original is kept, so unmerging restores it
bit-for-bit); :func:`remove_lorad` hands back plain layers, which is what export uses.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wadi_probe.errors import WadiInputError
from wadi_probe.rotation import rotate_pairs

if TYPE_CHECKING:  # pragma: no cover
    from wadi_distill.plan.planner import Plan

__all__ = [
    "LoRaDLayer",
    "LoRaDLinear",
    "LoRaDConv2d",
    "inject_lorad",
    "set_active_adapter",
    "adapter_disabled",
    "use_adapter",
    "lorad_parameters",
    "lorad_layers",
    "adapter_names",
    "merge_lorad",
    "unmerge_lorad",
    "remove_lorad",
    "delete_adapter",
    "lorad_param_count",
    "rotate_weight",
    "set_fused_rotation_backward",
]

ADAPTER_KINDS = ("lorad", "lora")
INITS = ("zeros_xavier", "random")
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class _RotateFrozenWeight(torch.autograd.Function):
    """R_Θ(W) for a frozen W with a hand-written backward (the forward is :func:`rotate_pairs`).

    d w'_{2j}/dθ = −w'_{2j+1} and d w'_{2j+1}/dθ = w'_{2j}, so dL/dθ = g_{2j+1}·w'_{2j} − g_{2j}·w'_{2j+1}: two
    products on the rotated weight, instead of autograd replaying cos/sin/stack backwards and keeping their
    intermediates. The rotated weight is kept in the compute dtype (fp32 for fp16/bf16 weights) for that.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        compute = torch.promote_types(weight.dtype, theta.dtype)
        rotated = rotate_pairs(weight.to(compute), theta.to(compute))
        ctx.save_for_backward(rotated)
        ctx.theta_dtype = theta.dtype
        return rotated.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (rotated,) = ctx.saved_tensors
        pairs = rotated.shape[1] // 2
        g = grad.to(rotated.dtype)
        grad_theta = g[:, 1 : 2 * pairs : 2] * rotated[:, 0 : 2 * pairs : 2] - g[:, 0 : 2 * pairs : 2] * rotated[:, 1 : 2 * pairs : 2]
        return None, grad_theta.to(ctx.theta_dtype)


_FUSED_BACKWARD = True


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device_type`` when it is on (a no-op otherwise)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (TypeError, RuntimeError):  # device types without autocast (e.g. meta)
        pass
    return contextlib.nullcontext()


def set_fused_rotation_backward(enabled: bool) -> bool:
    """Use the hand-written rotation backward for frozen bases (default on); returns the previous setting.

    Off, autograd differentiates :func:`rotate_pairs` directly (same values, more kernels and memory); the
    benchmark uses this to separate the two effects.
    """
    global _FUSED_BACKWARD
    previous, _FUSED_BACKWARD = _FUSED_BACKWARD, bool(enabled)
    return previous


def rotate_weight(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """R_Θ(W) for a weight matrix (out, fan_in) in W's dtype, differentiable in Θ (and in W when it needs grad)."""
    if _FUSED_BACKWARD and not weight.requires_grad and torch.is_grad_enabled() and theta.requires_grad:
        return _RotateFrozenWeight.apply(weight, theta)
    return rotate_pairs(weight, theta)


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter on one layer is: its kind, rank and (for LoRA) its scale."""

    kind: str
    rank: int
    scale: float = 1.0


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
        dtype = torch.promote_types(a.dtype, torch.float32)
        with _autocast_off(a.device.type):  # mixed precision must not turn the angles into fp16/bf16
            return a.to(dtype) @ b.to(dtype)

    def effective_weight(self, name: str | None = None) -> torch.Tensor:
        """The weight adapter ``name`` (default: the active one) gives, in the base weight's shape and dtype."""
        name = self.active_adapter if name is None else name
        source = self._source_weight()
        if name is None:
            return source
        self._require(name)
        spec = self.specs[name]
        matrix = source.reshape(source.shape[0], -1)
        if spec.kind == "lorad":
            adapted = rotate_weight(matrix, self.theta(name))
        else:
            delta = self.lora_B[name] @ self.lora_A[name]
            compute = torch.promote_types(matrix.dtype, delta.dtype)
            adapted = (matrix.to(compute) + spec.scale * delta.to(compute)).to(matrix.dtype)
        return adapted.reshape(source.shape)

    def _forward_weight(self) -> torch.Tensor:
        name = self.active_adapter
        if self.merged_adapter is not None and name == self.merged_adapter:
            return self.base_layer.weight  # the merged weight is already in place
        return self.effective_weight(name)

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
        merged = self.effective_weight(name).detach()
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
        return F.linear(x, self._forward_weight(), self.base_layer.bias)


class LoRaDConv2d(LoRaDLayer):
    """An ``nn.Conv2d`` with named LoRaD/LoRA adapters; the kernel is flattened to in/groups·kh·kw for pairing."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise WadiInputError(f"LoRaDConv2d wraps nn.Conv2d, got {type(base_layer).__name__}.")
        super().__init__(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _conv_forward honours stride, padding (including non-zero padding modes), dilation and groups.
        return self.base_layer._conv_forward(x, self._forward_weight(), self.base_layer.bias)


# --------------------------------------------------------------------------------------------- model level
def lorad_layers(model: nn.Module) -> dict[str, LoRaDLayer]:
    """Every wrapped layer of ``model`` by its module path (the path of the layer it replaced)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRaDLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in first-seen order."""
    seen: dict[str, None] = {}
    for layer in lorad_layers(model).values():
        for name in layer.specs:
            seen.setdefault(name, None)
    return list(seen)


def _plan_ranks(plan: "Plan | Mapping[str, int] | Iterable") -> dict[str, int]:
    if hasattr(plan, "layers"):
        return {e.module: int(e.rank) for e in plan.layers}
    if isinstance(plan, Mapping):
        return {str(k): int(v) for k, v in plan.items()}
    ranks: dict[str, int] = {}
    for item in plan:
        module, rank = (item.module, item.rank) if hasattr(item, "module") else item
        ranks[str(module)] = int(rank)
    return ranks


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject_lorad(
    model: nn.Module,
    plan: "Plan | Mapping[str, int] | Iterable",
    *,
    adapter_name: str = "default",
    init: str = "zeros_xavier",
    dtype: torch.dtype = torch.float32,
    kind: str = "lorad",
    scale: float = 1.0,
    activate: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Add adapter ``adapter_name`` to every layer of ``plan`` (a Plan, or a {module: rank} mapping).

    Plain ``nn.Linear`` / ``nn.Conv2d`` layers are replaced in place by :class:`LoRaDLinear` /
    :class:`LoRaDConv2d` (their base parameters frozen); layers already wrapped get one more adapter. Adapter
    parameters are created in ``dtype`` (fp32 by default, also for fp16/bf16 bases) on the layer's device.
    With ``activate`` the new adapter becomes the active one on those layers. Returns the module names adapted.
    """
    ranks = _plan_ranks(plan)
    modules = dict(model.named_modules())
    missing = [m for m in ranks if m not in modules]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WadiInputError(f"the model has no module called {shown}; was the plan made for another model?")
    for module_name in ranks:
        m = modules[module_name]
        if not isinstance(m, (LoRaDLayer, nn.Linear, nn.Conv2d)):
            raise WadiInputError(
                f"module {module_name} is a {type(m).__name__}; LoRaD adapts only nn.Linear and nn.Conv2d layers."
            )
        if isinstance(m, LoRaDLayer) and adapter_name in m.specs:
            raise WadiInputError(f"module {module_name} already has an adapter called {adapter_name!r}.")
    adapted: list[str] = []
    for module_name, rank in ranks.items():
        m = modules[module_name]
        if not isinstance(m, LoRaDLayer):
            m = LoRaDLinear(m) if isinstance(m, nn.Linear) else LoRaDConv2d(m)
            _set_submodule(model, module_name, m)
        m.add_adapter(adapter_name, rank, kind=kind, init=init, dtype=dtype, scale=scale, generator=generator)
        if activate:
            m.set_active(adapter_name)
        adapted.append(module_name)
    return adapted


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` on every layer that has it (the others run plain); ``None`` gives the plain base."""
    layers = lorad_layers(model)
    if name is not None and not any(name in layer.specs for layer in layers.values()):
        raise WadiInputError(f"the model has no adapter called {name!r} (it has: {', '.join(adapter_names(model)) or 'none'}).")
    for layer in layers.values():
        layer.active_adapter = name if name is not None and name in layer.specs else None


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run the body with adapter ``name`` active (``None``: the plain teacher), then restore what was active."""
    layers = lorad_layers(model)
    saved = {path: layer.active_adapter for path, layer in layers.items()}
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        for path, layer in layers.items():
            layer.active_adapter = saved[path]


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body as the plain base model (the teacher), then restore the active adapters."""
    with use_adapter(model, None):
        yield model


def lorad_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``adapter_name`` (both factors, every layer), in model order."""
    params: list[nn.Parameter] = []
    for layer in lorad_layers(model).values():
        for store in (layer.lorad_A, layer.lorad_B, layer.lora_A, layer.lora_B):
            if adapter_name in store:
                params.append(store[adapter_name])
    if not params:
        raise WadiInputError(f"the model has no adapter called {adapter_name!r} (it has: {', '.join(adapter_names(model)) or 'none'}).")
    return params


def lorad_param_count(model: nn.Module, adapter_name: str) -> int:
    """Number of trainable numbers in adapter ``adapter_name``: Σ r·(out + ⌊fan_in/2⌋) for LoRaD layers."""
    return sum(p.numel() for p in lorad_parameters(model, adapter_name))


def merge_lorad(model: nn.Module, adapter_name: str) -> None:
    """Merge adapter ``adapter_name`` into the base weights of every layer that has it (originals are kept)."""
    layers = [layer for layer in lorad_layers(model).values() if adapter_name in layer.specs]
    if not layers:
        raise WadiInputError(f"the model has no adapter called {adapter_name!r} (it has: {', '.join(adapter_names(model)) or 'none'}).")
    for layer in layers:
        layer.merge(adapter_name)


def unmerge_lorad(model: nn.Module) -> None:
    """Restore every merged layer's original weight bit-for-bit."""
    for layer in lorad_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop adapter ``adapter_name`` from every layer (wrappers stay, even when left without adapters)."""
    layers = [layer for layer in lorad_layers(model).values() if adapter_name in layer.specs]
    if not layers:
        raise WadiInputError(f"the model has no adapter called {adapter_name!r}.")
    for layer in layers:
        layer.delete_adapter(adapter_name)


def remove_lorad(model: nn.Module, *, merge: bool, adapter_name: str | None = None) -> nn.Module:
    """Replace every wrapper by its plain base layer and return ``model`` (changed in place).

    With ``merge=True`` the base layers keep the weights of ``adapter_name`` (default: whatever is merged,
    else the active adapter) — a plain diffusers model that loads with ``strict=True``. With ``merge=False``
    the original weights come back bit-for-bit.
    """
    for path, layer in lorad_layers(model).items():
        if merge:
            name = adapter_name or layer.merged_adapter or layer.active_adapter
            if name is not None and name in layer.specs:
                layer.merge(name)
            elif layer.merged_adapter is not None:
                layer.unmerge()
            layer._original_weight = None
            layer.merged_adapter = None
        else:
            layer.unmerge()
        for n, p in layer.base_layer.named_parameters():
            p.requires_grad_(layer._base_requires_grad.get(n, True))
        _set_submodule(model, path, layer.base_layer)
    return model
