"""Peak memory and time of one VSD step at a teacher family's real size, estimated on a CPU without allocating.

The denoiser is built from its published config (``benchmarks/configs/*.json``) under torch's ``FakeTensorMode``:
every parameter and activation is a meta-backed fake tensor (shapes, dtypes, no storage), so Flux.1-dev's 12B
parameters cost nothing. On it runs one real VSD step of the trainer's kind — the student and fake-score LoRaD
adapters (``plan_from_preset(..., "paper")``, student rank 256, fake rank 32) injected into the one frozen base, the
base cast to bf16 and the adapters kept fp32, the registered teacher family's call and schedule, autocast,
diffusers' gradient checkpointing, :class:`VSDStep`'s student loss (student forward with graph, teacher and fake
forwards with CFG) and backward, clipping and AdamW (``foreach=False``), the student's weight average, then the
fake score's loss, backward and AdamW — with the real autograd,
checkpointing and attention kernels choosing what each op keeps. A dispatch mode adds up the bytes of every
tensor storage alive (each rounded up to 512 bytes, as CUDA's caching allocator rounds) and keeps the peak; it
also adds up the FLOPs of every op torch's FLOP counter knows (and of the CPU flash-attention kernel).

What the estimate is not: it counts tensors, not the allocator (fragmentation and the cache: ``max_memory_reserved``
exceeds ``max_memory_allocated`` by 5-20 % in practice), nor the CUDA context (0.5-1 GiB) or cuBLAS workspaces.
The fake tensors live on the CPU, so the CPU's choices are made (its flash-attention kernel, which keeps the same
output and log-sum-exp as CUDA's flash kernel; CPU autocast, whose bf16 op list matches CUDA's for matmuls and
convolutions). The text encoders are not counted: the trainer encodes every prompt once into an embedding cache and
frees the encoders before the first step (``VSDTrainer._prepare_conditioning``); the VAE stays on the host.

Time is an estimate too: the step's FLOPs (checkpointing's recomputation included) at a stated fraction of an
H100/H200's dense bf16 peak (989 TFLOP/s).

    python benchmarks/flow_memory.py --family flux
    python benchmarks/flow_memory.py --family sd3 --config benchmarks/configs/sd3.5-large.json
    python benchmarks/flow_memory.py --family sd15 --precision fp32 --no-checkpointing   # the CPU-measured case
    python benchmarks/flow_memory.py --family sd15 --no-checkpointing --real   # the same step on real tensors
    python benchmarks/flow_memory.py --family flux --device cuda --steps 2     # measured on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts (vsd_step's RSS reader)
CONFIG_DIR = HERE / "configs"
BLOCK_BYTES = 512  # CUDA's caching allocator hands out multiples of 512 bytes
H100_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM, dense bf16 tensor cores
DEFAULT_UTILISATION = 0.4
GIB = 2**30
#: cards by their memory in GB (1e9 bytes) as sold, and a name for the table
CARDS = ((24, "24 GB (RTX 4090, L4)"), (48, "48 GB (L40S, A6000)"), (80, "80 GB (A100, H100)"),
         (141, "141 GB (H200)"))
#: what a card must hold beyond the estimated peak: the CUDA context and library workspaces, and what the GPU
#: holds beyond the metered tensors. Measured on an H200 (2026-12-04, SANA 1.6B and SD3.5 Large at 1024 px):
#: peak allocated 1.14x the estimate, reserved 1.01-1.02x the allocated, so 1.17x in all
CONTEXT_BYTES = 1 * GIB
ALLOCATOR_SLACK = 0.17


# ------------------------------------------------------------------------------------------ the families
@dataclass(frozen=True)
class FamilySpec:
    """What a VSD step of a family needs besides its denoiser: image size and VAE scale, the text conditioning's
    token count (as the family's ``encode`` gives it; the widths are read from the denoiser's config), CFG, and
    the embedded guidance of a guidance-distilled denoiser."""

    name: str
    config: str  # default config file in benchmarks/configs
    image_size: int
    vae_scale: int
    text_tokens: int
    text_width_key: str  # the config key of the text states' width
    pooled_key: str | None = None  # the config key of the pooled embedding's width
    attention_mask: bool = False
    packed: bool = False  # Flux: in_channels = 4 x latent channels (2x2 packing)
    cfg: float = 1.5  # the run's default (Flux.1-dev: 1, guidance embedded)
    guidance: float | None = None

    def shapes(self, config: dict[str, Any], image_size: int | None = None,
               text_tokens: int | None = None) -> dict[str, Any]:
        """Latent shape and conditioning shapes for a denoiser ``config``."""
        channels = int(config["in_channels"]) // (4 if self.packed else 1)
        side = int(image_size or self.image_size) // self.vae_scale
        return {"latent_shape": (channels, side, side), "text_tokens": int(text_tokens or self.text_tokens),
                "text_width": int(config[self.text_width_key]),
                "pooled_width": int(config[self.pooled_key]) if self.pooled_key else None}


FAMILIES: dict[str, FamilySpec] = {
    "sd15": FamilySpec("sd15", "sd15.json", 512, 8, 77, "cross_attention_dim"),
    # SD3/SD3.5: 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline's default), CLIP-L+G pooled
    "sd3": FamilySpec("sd3", "sd3.5-large.json", 1024, 8, 77 + 256, "joint_attention_dim", "pooled_projection_dim"),
    # Flux.1-dev: T5 512 tokens (FluxPipeline's max_sequence_length), CLIP-L pooled, embedded guidance, no CFG
    "flux": FamilySpec("flux", "flux.1-dev.json", 1024, 8, 512, "joint_attention_dim", "pooled_projection_dim",
                       packed=True, cfg=1.0, guidance=3.5),
    # SANA: Gemma2-2B states, 300 positions with their mask; AutoencoderDC f32c32
    "sana": FamilySpec("sana", "sana-1600m-1024px.json", 1024, 32, 300, "caption_channels", attention_mask=True),
}


#: tiny configs of the four families (seconds on a CPU) with the image side that gives them a few latent tokens:
#: the tests and ``gpu_check.py --size tiny`` run the step on them
TINY_CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "sd15": ({"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
              "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
              "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 16}, 64),
    "sd3": ({"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
             "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
             "caption_projection_dim": 16, "pooled_projection_dim": 24, "out_channels": 4, "pos_embed_max_size": 16,
             "qk_norm": "rms_norm", "dual_attention_layers": [0]}, 64),
    "flux": ({"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 1,
              "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "pooled_projection_dim": 24, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}, 64),
    "sana": ({"_class_name": "SanaTransformer2DModel", "in_channels": 4, "out_channels": 4, "num_attention_heads": 2,
              "attention_head_dim": 8, "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
              "cross_attention_dim": 16, "caption_channels": 24, "mlp_ratio": 2.5, "sample_size": 8, "patch_size": 1,
              "norm_elementwise_affine": False}, 256),
}


def write_tiny_config(family: str, folder: Path) -> tuple[Path, int]:
    """``family``'s tiny config written as ``folder/tiny-FAMILY.json``; the path and the image side to run it at."""
    config, image_size = TINY_CONFIGS[family]
    path = Path(folder) / f"tiny-{family}.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path, image_size


def _family_class(family: str):
    import wadi_distill.teachers.families  # noqa: F401  (registers the families)
    from wadi_distill.teachers.teacher import TEACHER_FAMILIES

    return TEACHER_FAMILIES["sd" if family == "sd15" else family]


def schedule_for(family: str, latent_shape: tuple[int, int, int]):
    """The family's noise schedule from its released scheduler config, through the family's own ``schedule``
    (SD3's logit-normal draws; Flux's dynamic shift resolved from the image's token count)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd15":
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    elif family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # SD3/SD3.5 and SANA 1024 px: shift 3
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = _family_class(family).schedule(scheduler)
    if family == "flux":
        schedule = schedule.with_image_tokens((latent_shape[1] // 2) * (latent_shape[2] // 2))
    return schedule


def family_call(family: str, spec: FamilySpec, image_size: int, channels: int):
    """The registered teacher family's call convention (``family(model, x_t, t, cond)``, and ``for_role``), with the
    embedded guidance a guidance-distilled release runs at."""
    call = _family_class(family)(image_size, channels)
    if spec.guidance is not None:
        call.guidance = spec.guidance
    return call


def read_config(path: str | Path) -> tuple[type[nn.Module], dict[str, Any]]:
    """A diffusers model config file: the model class (its ``_class_name``) and the constructor's arguments."""
    import diffusers

    data = json.loads(Path(path).read_text())
    name = data.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{path} names no diffusers model class (_class_name {name!r}).")
    return cls, {k: v for k, v in data.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------ counting
class StepMeter(TorchDispatchMode):
    """Bytes of every tensor storage alive (each counted once, rounded up to :data:`BLOCK_BYTES`), its peak and the
    phase the peak fell in, and the FLOPs of the ops torch's FLOP counter has formulas for."""

    def __init__(self, block: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.block = block
        self.storages = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.peak_phase = ""
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.flops = 0

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage from now until it is freed (a no-op if it is counted already)."""
        storage = tensor.untyped_storage()
        if storage in self.storages:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        self.storages[storage] = weakref.finalize(storage, self._free, size)
        self.current += size
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.flops += _op_flops(func, args, kwargs, out)
        tree_map_only(torch.Tensor, self.track, _physical_outputs(func, args, kwargs, out))
        return out


def _physical_outputs(func, args, kwargs, out) -> list[Any]:
    """``out`` with each result that aliases an argument (an in-place op's ``self``, an ``out=`` tensor, a view's
    base, as the op's schema says) replaced by that argument: its storage is the argument's.

    The step runs outside the fake mode, so a factory op (``torch.empty``) makes a real CPU tensor even where the
    parameters are fake; an in-place or ``out=`` op writing into it with fake operands returns a fake copy of it,
    with a storage of its own, while the program goes on holding the real tensor, the only storage that exists.
    Counting the argument counts that one storage in both modes.
    """
    schema = getattr(func, "_schema", None)
    if schema is None:
        return [out]
    by_alias: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None:
            continue
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        for name in arg.alias_info.before_set:
            by_alias[name] = value
    outs = list(out) if isinstance(out, (tuple, list)) and len(schema.returns) > 1 else [out]
    for i, ret in enumerate(schema.returns[: len(outs)]):
        names = ret.alias_info.before_set if ret.alias_info is not None else ()
        source = next((by_alias[n] for n in names if by_alias.get(n) is not None), None)
        if source is not None:
            outs[i] = source
    return outs


def _op_flops(func, args, kwargs, out) -> int:
    from torch.utils import flop_counter

    packet = func._overloadpacket
    if packet in flop_counter.flop_registry:
        return int(flop_counter.flop_registry[packet](*args, **kwargs, out_val=out))
    aten = torch.ops.aten
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:  # not in torch's registry
        return int(flop_counter.sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return int(flop_counter.sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape))
    return 0


# ------------------------------------------------------------------------------------------ the step
@dataclass
class VSDSetup:
    """One frozen base with the student and fake adapters, their optimizers, and the step's fixed inputs."""

    base: nn.Module
    student_params: list[nn.Parameter]
    fake_params: list[nn.Parameter]
    opt_student: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    counts: dict[str, int]
    layers: list[nn.Module]
    ema: Any = None  # the student's weight average (diffusers' EMAModel), the trainer's default


def prepare(base: nn.Module, rank: int, fake_rank: int, dtype: torch.dtype, checkpointing: bool,
            generator: torch.Generator, ema: bool = True) -> VSDSetup:
    """Adapters and optimizers as ``VSDTrainer._prepare_models`` / ``_prepare_optimizers`` make them: the paper preset
    at ``rank`` (student) and ``fake_rank``, the frozen base in ``dtype``, the adapters fp32, AdamW, and (``ema``,
    the run's default) the student's weight average, an fp32 copy of its adapter on the same device."""
    from wadi_distill.lorad.model import inject_lorad, lorad_layers, lorad_parameters
    from wadi_distill.plan import plan_from_preset

    base.requires_grad_(False)
    base.eval()
    plan = plan_from_preset(base, rank, "paper")
    fake_plan = plan_from_preset(base, fake_rank, "paper")
    counts = {"base_params": sum(p.numel() for p in base.parameters()),
              "base_buffer_bytes": sum(b.numel() * b.element_size() for b in base.buffers()),
              "adapted_layers": len(plan.layers), "student_params": plan.trainable_params,
              "fake_params": fake_plan.trainable_params}
    inject_lorad(base, plan, adapter_name="student", generator=generator, activate=False)
    inject_lorad(base, fake_plan, adapter_name="fake", generator=generator, activate=False)
    for p in base.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    counts["base_bytes"] = sum(p.numel() * p.element_size() for p in base.parameters() if not p.requires_grad)
    student, fake = lorad_parameters(base, "student"), lorad_parameters(base, "fake")
    for p in student + fake:
        p.requires_grad_(True)
    if checkpointing:
        base.enable_gradient_checkpointing()
    opt_s = torch.optim.AdamW(student, lr=1e-6, foreach=False)
    opt_f = torch.optim.AdamW(fake, lr=1e-6, foreach=False)
    average = None
    if ema:
        from diffusers.training_utils import EMAModel

        average = EMAModel(student, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=True)
    return VSDSetup(base, student, fake, opt_s, opt_f, counts, list(lorad_layers(base).values()), average)


def vsd_step(setup: VSDSetup, call, schedule, spec: FamilySpec, shapes: dict[str, Any], batch: int,
             dtype: torch.dtype, device: str, meter: StepMeter | None = None, seed: int = 0) -> dict[str, float]:
    """One VSD step as ``VSDTrainer.train_step`` runs it (one fake update); the conditioning is random, in the
    ``shapes`` the family's encoders give (:meth:`FamilySpec.shapes`). Returns the two losses (NaN where the tensors
    are fake)."""
    from wadi_distill.teachers.conditioning import Conditioning
    from wadi_distill.vsd import losses
    from wadi_distill.vsd.step import VSDStep

    gen = torch.Generator().manual_seed(seed)
    names = {"teacher": None, "student": "student", "fake": "fake"}

    @contextlib.contextmanager
    def active(role: str):
        name = names[role]
        for layer in setup.layers:
            layer.active_adapter = name if name in layer.specs else None
        try:
            yield
        finally:
            for layer in setup.layers:
                layer.active_adapter = None

    def phase(name: str) -> None:
        if meter is not None:
            meter.phase = name

    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def predict(role, x, t, cond):
        phase(f"{role} forward" + (" (graph)" if torch.is_grad_enabled() else ""))
        with autocast, active(role):
            return call.for_role(role)(setup.base, x, t, cond).float()

    def conditioning(n: int, null: bool = False) -> Conditioning:
        size = (n, shapes["text_tokens"], shapes["text_width"])
        states = torch.zeros(size) if null else torch.randn(size, generator=gen)
        pooled = torch.randn(n, shapes["pooled_width"], generator=gen) if shapes["pooled_width"] else None
        mask = torch.ones(n, shapes["text_tokens"], dtype=torch.long) if spec.attention_mask else None
        return Conditioning(states.to(dtype), pooled=None if pooled is None else pooled.to(dtype),
                            attention_mask=mask).to(device)

    def noise() -> torch.Tensor:
        return torch.randn(batch, *shapes["latent_shape"], generator=gen).to(device)

    def apply(loss, params, optimizer, role):
        phase(f"{role} backward")
        with active(role):
            loss.backward()
        phase(f"{role} optimizer")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = VSDStep(schedule, predict, conditioning(1, null=True), spec.cfg)
    cond = conditioning(batch)
    z = noise()
    t = losses.student_timesteps(batch, schedule, gen).to(device)
    loss_s, x0 = step.student_loss(z, cond, t, noise())
    apply(loss_s, setup.student_params, setup.opt_student, "student")
    if setup.ema is not None:
        setup.ema.step(setup.student_params)
    t2 = losses.fake_timesteps(batch, schedule, gen).to(device)
    use_null = losses.null_prompt_mask(batch, gen).to(device)
    loss_f = step.fake_loss(x0.detach(), cond, t2, noise(), use_null)
    apply(loss_f, setup.fake_params, setup.opt_fake, "fake")
    phase("")
    from torch._subclasses.fake_tensor import FakeTensor

    return {k: float("nan") if isinstance(v, FakeTensor) else float(v.detach())
            for k, v in (("loss_student", loss_s), ("loss_fake", loss_f))}


# ------------------------------------------------------------------------------------------ the estimate
def estimate(family: str, config: str | Path | None = None, *, batch: int = 1, rank: int = 256, fake_rank: int = 32,
             precision: str = "bf16", checkpointing: bool = True, image_size: int | None = None,
             text_tokens: int | None = None, ema: bool = True, fake: bool = True,
             block: int = BLOCK_BYTES) -> dict[str, Any]:
    """Peak memory and FLOPs of one VSD step of ``family`` built from ``config`` (default: the family's), at the
    family's image size and prompt length unless given.

    ``fake=False`` runs the same step on real CPU tensors (tiny configs only): the tests compare the two.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = FAMILIES[family]
    path = Path(config) if config else CONFIG_DIR / spec.config
    cls, kwargs = read_config(path)
    shapes = spec.shapes(kwargs, image_size, text_tokens)
    size = int(image_size or spec.image_size)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    started = time.perf_counter()
    torch.manual_seed(0)
    with mode:
        base = cls(**kwargs)
        setup = prepare(base, rank, fake_rank, dtype, checkpointing, torch.Generator().manual_seed(7919), ema)
    meter = StepMeter(block)
    for tensor in [*base.parameters(), *base.buffers()]:
        meter.track(tensor)
    static = meter.current
    # the step runs outside the fake mode: small tensors (timesteps, noise, the schedule's tables) stay real, so
    # the schedule's checks on their values work; every op that meets a fake parameter gives a fake result
    with meter:
        call = family_call(family, spec, size, shapes["latent_shape"][0])
        losses = vsd_step(setup, call, schedule_for(family, shapes["latent_shape"]), spec, shapes, batch, dtype,
                          "cpu", meter)
    adapter_bytes = 4 * (setup.counts["student_params"] + setup.counts["fake_params"])
    return {
        "family": family, "config": path.name, "class": cls.__name__, "batch": batch, "rank": rank,
        "fake_rank": fake_rank, "precision": precision, "checkpointing": checkpointing, "ema": ema, "fake": fake,
        "image_size": size, "latent_shape": list(shapes["latent_shape"]), "text_tokens": shapes["text_tokens"],
        "cfg": spec.cfg, **setup.counts,
        "adapter_bytes": adapter_bytes, "static_bytes": static, "peak_bytes": meter.peak,
        "peak_phase": meter.peak_phase, "end_bytes": meter.current, "phase_peaks": meter.phase_peaks,
        "optimizer_bytes": 2 * adapter_bytes, "ema_bytes": 4 * setup.counts["student_params"] if ema else 0,
        "flops": meter.flops, "losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure(family: str, config: str | Path | None = None, *, batch: int = 1, rank: int = 256, fake_rank: int = 32,
            precision: str = "bf16", checkpointing: bool = True, image_size: int | None = None, ema: bool = True,
            steps: int = 3, warmup: int = 1, device: str = "cuda") -> dict[str, Any]:
    """The same VSD step on a real device (random weights built there): step times after ``warmup`` steps, and on
    CUDA the peak memory allocated and reserved by torch over the timed steps (weights included)."""
    spec = FAMILIES[family]
    path = Path(config) if config else CONFIG_DIR / spec.config
    cls, kwargs = read_config(path)
    shapes = spec.shapes(kwargs, image_size)
    size = int(image_size or spec.image_size)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    cuda = device == "cuda"
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation on the device (seconds for 12B parameters on a GPU)
        base = cls(**kwargs)
    base.to(device)  # buffers a config builds from numpy (SD3's position table) are made on the CPU
    setup = prepare(base, rank, fake_rank, dtype, checkpointing, torch.Generator(device).manual_seed(7919), ema)
    build_s = time.perf_counter() - started
    call = family_call(family, spec, size, shapes["latent_shape"][0])
    schedule = schedule_for(family, shapes["latent_shape"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    times, losses = [], {}
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begun = time.perf_counter()
        losses = vsd_step(setup, call, schedule, spec, shapes, batch, dtype, device, seed=i)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - begun)
    result = {"family": family, "config": path.name, "class": cls.__name__, "device": device, "batch": batch,
              "rank": rank, "fake_rank": fake_rank, "precision": precision, "checkpointing": checkpointing,
              "image_size": size, "latent_shape": list(shapes["latent_shape"]), "text_tokens": shapes["text_tokens"],
              "cfg": spec.cfg, **setup.counts, "build_s": round(build_s, 1), "step_s": times, "losses": losses}
    if cuda:
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(), gpu=torch.cuda.get_device_name())
    return result


def card_fit(peak_bytes: int) -> tuple[int, str] | None:
    """The smallest card of :data:`CARDS` that holds ``peak_bytes`` with the context and the allocator's slack."""
    need = peak_bytes * (1 + ALLOCATOR_SLACK) + CONTEXT_BYTES
    for gb, name in CARDS:
        if need <= gb * 1e9:
            return gb, name
    return None


def step_seconds(flops: float, utilisation: float = DEFAULT_UTILISATION) -> float:
    """Estimated step time on an H100/H200 at ``utilisation`` of its dense bf16 peak."""
    return flops / (H100_BF16_DENSE_FLOPS * utilisation)


def render(result: dict[str, Any], utilisation: float = DEFAULT_UTILISATION) -> str:
    """The estimate as a table of at most 80 columns."""
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    fit = card_fit(result["peak_bytes"])
    c, h, w = result["latent_shape"]
    rows = [
        ("denoiser", f"{result['class']} ({result['config']})"),
        ("base parameters", f"{result['base_params'] / 1e9:.3f} B, {result['base_bytes'] / GIB:.2f} GiB in "
                            f"{result['precision']}"),
        ("base buffers", f"{result['base_buffer_bytes'] / GIB:.2f} GiB (kept in their own dtype)"),
        ("adapted layers", f"{result['adapted_layers']} (paper preset)"),
        ("student adapter", f"rank {result['rank']}: {result['student_params']:,} params (fp32)"),
        ("fake adapter", f"rank {result['fake_rank']}: {result['fake_params']:,} params (fp32)"),
        ("step", f"batch {result['batch']}, latents {c}x{h}x{w}, {result['text_tokens']} text tokens, "
                 f"cfg {result['cfg']:g}"),
        ("", f"{result['precision']}, gradient checkpointing {'on' if result['checkpointing'] else 'off'}"),
        ("weights + adapters", gib(result["static_bytes"])),
        ("Adam states", gib(result["optimizer_bytes"])),
        ("student average", gib(result["ema_bytes"]) + ("" if result["ema"] else " (--no-ema)")),
        ("estimated peak" if result["fake"] else "metered peak",
         f"{gib(result['peak_bytes'])} (in: {result['peak_phase']})"),
        ("  above the weights", gib(result["peak_bytes"] - result["static_bytes"])),
        ("smallest card", fit[1] if fit else "none of 24/48/80/141 GB"),
        ("step FLOPs", f"{result['flops'] / 1e12:,.1f} TFLOP"),
        ("est. step time", f"{step_seconds(result['flops'], utilisation):.2f} s on an H100/H200 at "
                           f"{utilisation:.0%} of 989 TFLOP/s"),
    ]
    if "peak_rss_above_imports" in result:
        rows.insert(12, ("peak RSS - imports", gib(result["peak_rss_above_imports"])))
    width = max(len(k) for k, _ in rows)
    kind = "ESTIMATE (fake tensors, no allocation)" if result["fake"] else "real CPU tensors, metered"
    lines = [f"VSD step of {result['family']}: {kind}", "-" * 72]
    lines += [f"{k:<{width}}  {v}"[:80] for k, v in rows]
    lines.append(f"card rule: peak x {1 + ALLOCATOR_SLACK:.2f} + {CONTEXT_BYTES / GIB:.0f} GiB (CUDA context) "
                 "<= card")
    return "\n".join(lines)


def render_measured(result: dict[str, Any]) -> str:
    """A GPU measurement as a few lines of at most 80 columns."""
    times = sorted(result["step_s"])
    lines = [f"VSD step of {result['family']} on {result.get('gpu', result['device'])}: MEASURED",
             f"  {result['class']} ({result['config']}), batch {result['batch']}, {result['precision']}, "
             f"checkpointing {'on' if result['checkpointing'] else 'off'}",
             f"  step {times[len(times) // 2]:.3f} s (median of {len(times)}; min {times[0]:.3f}, max {times[-1]:.3f})"]
    if "peak_allocated_bytes" in result:
        lines.append(f"  peak allocated {result['peak_allocated_bytes'] / GIB:.2f} GiB, reserved "
                     f"{result['peak_reserved_bytes'] / GIB:.2f} GiB")
    return "\n".join(line[:80] for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--config", help="A diffusers model config.json (default: the family's in benchmarks/configs).")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--fake-rank", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="Image side in pixels (default: the family's, 512 or 1024).")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--no-ema", action="store_true", help="No weight average of the student (the run's --no-ema).")
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION,
                        help="Fraction of the GPU's dense bf16 peak the step time estimate assumes (default 0.4).")
    parser.add_argument("--real", action="store_true",
                        help="Run the step on real CPU tensors instead (tiny or SD1.5-sized configs): the meter's peak "
                             "and the process's peak RSS above the imports, to check the estimate against.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: run the step on the GPU (random weights) and measure it instead of estimating.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps on the GPU (after one warm-up step).")
    parser.add_argument("--json", type=Path, help="Also write the numbers to this JSON file.")
    args = parser.parse_args(argv)
    if args.config and not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.image_size is not None and (args.image_size < 1 or args.image_size % (2 * FAMILIES[args.family].vae_scale)):
        parser.error(f"--image-size must be a positive multiple of {2 * FAMILIES[args.family].vae_scale} for "
                     f"{args.family}")
    if min(args.batch_size, args.rank, args.fake_rank, args.steps) < 1 or not 0 < args.utilisation <= 1:
        parser.error("--batch-size, --rank, --fake-rank and --steps must be at least 1 and --utilisation in (0, 1]")
    torch.set_num_threads(1)
    from vsd_step import _peak_rss

    import diffusers  # noqa: F401  (imported before the RSS baseline)

    rss0 = _peak_rss()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda was asked for but torch sees no CUDA GPU")
        result = measure(args.family, args.config, batch=args.batch_size, rank=args.rank, fake_rank=args.fake_rank,
                         precision=args.precision, checkpointing=not args.no_checkpointing,
                         image_size=args.image_size, ema=not args.no_ema, steps=args.steps)
        print(render_measured(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    try:
        result = estimate(args.family, args.config, batch=args.batch_size, rank=args.rank, fake_rank=args.fake_rank,
                          precision=args.precision, checkpointing=not args.no_checkpointing,
                          image_size=args.image_size, ema=not args.no_ema, fake=not args.real)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.real:
        result["peak_rss_above_imports"] = _peak_rss() - rss0
    print(render(result, args.utilisation))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
