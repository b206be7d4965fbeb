"""What the distiller needs from a teacher (:class:`Teacher`), and the interface every teacher family implements.

A :class:`TeacherFamily` subclass says, for one kind of pipeline, how its folder is recognised and loaded, how
prompts become :class:`~wadi_distill.teachers.conditioning.Conditioning`, how its denoiser is called on
``(x_t, t, cond)``, and which noise schedule it runs on. Families are registered by name in
:data:`TEACHER_FAMILIES` with :func:`register_family`; :func:`wadi_distill.teachers.pipeline.load_teacher` asks
them. The families themselves are in :mod:`wadi_distill.teachers.families`: a new one is one class there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from wadi_distill.schedules import FlowMatchSchedule, NoiseSchedule, schedule_from_scheduler
from wadi_distill.teachers.components import load_component, vae_decoder
from wadi_distill.teachers.conditioning import Conditioning
from wadi_probe.errors import WadiInputError

if TYPE_CHECKING:
    from wadi_distill.builtin.digits.model import DigitsModel

__all__ = ["Teacher", "TeacherFamily", "TextEncoders", "TEACHER_FAMILIES", "register_family", "family_for_pipeline",
           "canonical_config", "batch_timesteps"]


def batch_timesteps(t: torch.Tensor, batch: int) -> torch.Tensor:
    """One timestep per sample: a scalar ``t`` expanded to (batch,), a (B,) tensor as it is."""
    return t.expand(batch) if t.ndim == 0 else t


# --------------------------------------------------------------------------------------------- text encoders


class TextEncoders:
    """The pipeline's tokenizer(s) and text encoder(s); :meth:`encode` turns prompts into :class:`Conditioning`
    the way the teacher's family does (:meth:`TeacherFamily.encode`).

    The embeddings equal diffusers' ``encode_prompt`` (tests/wadi_distill/teachers/test_conditioning.py: SD and SDXL bit for bit,
    PixArt's T5 within float rounding). Ours is kept because ``encode_prompt`` needs a whole pipeline object
    (every component loaded, while only the encoding process should hold the text encoders), and because the
    embedding cache runs the null prompt through the same call as every other prompt.
    """

    def __init__(self, family: "TeacherFamily", tokenizers: list[Any], encoders: list[nn.Module], *,
                 max_length: int | None = None, zeros_for_empty_prompt: bool = False) -> None:
        self.family = family
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.max_length = max_length
        self.zeros_for_empty_prompt = zeros_for_empty_prompt

    def to(self, device: torch.device | str) -> "TextEncoders":
        for enc in self.encoders:
            enc.to(device)
        return self

    def tokenize(self, tokenizer: Any, prompts: list[str], max_length: int | None):
        """Tokens padded and truncated to ``max_length`` (default: the tokenizer's own limit, else 77)."""
        length = max_length or getattr(tokenizer, "model_max_length", 77)
        if length is None or length > 100_000:  # tokenizers without a limit report a huge sentinel
            length = 77
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode ``prompts`` (an empty string is the null prompt) on the encoders' device, as fp32 on CPU."""
        device = next(self.encoders[0].parameters()).device
        return self.family.encode(self, prompts, device).to("cpu", torch.float32)

    def free(self) -> None:
        """Drop the encoders (and their memory) once the embedding cache is written."""
        self.encoders.clear()
        self.tokenizers.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    """Everything the distiller needs from a teacher, with the text encoders separable (freed after caching)."""

    denoiser: nn.Module
    family: "TeacherFamily"  # calls the denoiser: ``teacher.call(model, x_t, t, cond)``
    schedule: NoiseSchedule
    latent_shape: tuple[int, int, int]
    source: str
    encode_prompts: Callable[[list[str]], Conditioning] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [0, 1]
    null_prompt: str = ""
    #: the pipeline class of a diffusers folder (``model_index.json``'s ``_class_name``); None for the built-in world
    pipeline_class: str | None = None
    #: the text encoders behind ``encode_prompts`` while they are loaded (moved to the device, freed after caching)
    text_encoders: TextEncoders | None = None
    #: the prompts a run trains on when given none (the built-in world's class prompts); None: a prompt file is needed
    default_prompts: list[str] | None = None
    #: the built-in digits model itself (its sampler and label prompts), for ``builtin:`` teachers only
    builtin: "DigitsModel | None" = None

    @property
    def call(self) -> "TeacherFamily":
        """The calling convention of the denoiser as the one-step student runs it: ``teacher.call(model, x_t, t,
        cond)`` → raw prediction (the family itself unless the student's inputs differ, see
        :meth:`TeacherFamily.for_role`)."""
        return self.family.for_role("student")

    @property
    def image_size(self) -> int:
        """Side of the decoded images in pixels."""
        return self.family.image_size

    def free_text_encoders(self) -> None:
        """Drop the text encoders once the prompts are encoded (``encode_prompts`` no longer works then)."""
        if self.text_encoders is not None:
            self.text_encoders.free()
            self.text_encoders = None

    @property
    def fingerprint(self) -> str:
        """A short hash of the denoiser's class and canonical config: checkpoints, caches and plans refuse other
        teachers by it; the same in every process (see :func:`canonical_config`)."""
        text = json.dumps({"class": type(self.denoiser).__name__, "config": canonical_config(self.denoiser)},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def weights_digest(self) -> str:
        """A hash of a few of the denoiser's weight tensors (first, middle, last): tells apart two teachers
        with the same architecture, cheaply (SD-sized models are not read in full)."""
        params = [p for _, p in sorted(self.denoiser.named_parameters())]
        digest = hashlib.sha256()
        for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def canonical_config(model: nn.Module) -> dict[str, Any]:
    """The model's config as it decides the architecture: private keys dropped, defaults filled, lists not tuples.

    diffusers fills every init argument the ``config.json`` lacks with its default when it loads a model, and
    records the bookkeeping keys ``_use_default_values`` (a list whose order follows Python's hash seed),
    ``_name_or_path`` (where it was read from), ``_diffusers_version`` and ``_class_name``. Those say nothing
    about the weights' meaning, so they are dropped: an original SD1.5 ``config.json`` that lacks newer keys gives
    the same canonical config in every process and from every path.
    """
    config = getattr(model, "config", None) or {}
    canonical = json.loads(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                                      default=str))
    return dict(sorted(canonical.items()))


# --------------------------------------------------------------------------------------------- families


class TeacherFamily:
    """One family of teachers: how to recognise and load it, condition it, call its denoiser, which schedule.

    An instance is the denoiser's calling convention for one teacher (its image size and latent channels):
    ``family(model, x_t, t, cond)`` returns the raw prediction with the latent's channel count. The defaults load
    a diffusers pipeline folder whose ``model_index.json`` names one of :attr:`pipeline_classes`.
    """

    #: the registry key and what ``training.json`` and messages call the family
    name: ClassVar[str] = "base"
    #: diffusers pipeline classes (``model_index.json``'s ``_class_name``) this family loads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the pipeline component that is the denoiser, and the denoiser classes the family can call
    denoiser_component: ClassVar[str] = "unet"
    denoiser_classes: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)
    #: the text-encoder components, in the order :meth:`encode` uses them (tokenizers are named alike)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: whether the teacher's weights are files a merged student can be exported from (with their keys and dtypes)
    weights_on_disk: ClassVar[bool] = True
    #: the VSD guidance scale a run uses when given none (None: the distiller's default)
    default_cfg: ClassVar[float | None] = None
    #: whether the text encoders' activations overflow fp16 (T5, Gemma2): an fp16 request loads them in bf16
    text_encoders_overflow_fp16: ClassVar[bool] = False
    #: flow-matching families: the denoiser's timestep at σ = 1 as the family's pipeline feeds it (SD3, SANA: 1000;
    #: Flux: 1); None for a family on a VP schedule
    flow_timestep_scale: ClassVar[float | None] = None
    #: the ``num_train_timesteps`` a flow family's scheduler must have (its pipeline's timesteps assume it)
    flow_train_timesteps: ClassVar[int] = 1000

    def __init__(self, image_size: int, in_channels: int) -> None:
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        #: the embedded guidance this convention passes (a guidance-distilled denoiser's input, FLUX.1-dev's);
        #: None: the denoiser has no guidance input
        self.guidance: float | None = None

    def set_guidance(self, value: float | None) -> None:
        """Make ``value`` the real score's embedded guidance; refused, in one sentence, for a denoiser without a
        guidance input (``None`` keeps the family's default)."""
        if value is None:
            return
        if self.guidance is None:
            raise WadiInputError(f"This {self.name} teacher has no guidance embedding, so a guidance value "
                                 f"({value:g}) does not apply to it; leave --guidance out.")
        if not math.isfinite(float(value)) or value < 0:
            raise WadiInputError(f"The guidance must be a non-negative number, not {value:g}.")
        self.guidance = float(value)

    def for_role(self, role: str) -> "TeacherFamily":
        """The calling convention for a VSD role (``teacher``, ``fake`` or ``student``): the family itself unless
        the roles' inputs differ (Flux's student runs at a fixed embedded guidance)."""
        return self

    # ---------------------------------------------------------------- call
    def __call__(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw prediction (ε, v or x0 as the schedule says) at ``(x_t, t)`` under ``cond``; ``t`` is
        the schedule's timestep (VP: integers; flow: σ ∈ [0, 1] in float32, converted here to the denoiser's own
        convention)."""
        raise NotImplementedError

    def flow_timesteps(self, t: torch.Tensor, batch: int, scale: float = 1.0) -> torch.Tensor:
        """The denoiser's timesteps (B,) for the flow schedule's σ ``t``: σ·:attr:`flow_timestep_scale`·``scale``
        in float32 (``scale``: a denoiser's own factor on top, e.g. SANA's ``timestep_scale``)."""
        return batch_timesteps(t, batch).float() * (float(self.flow_timestep_scale) * scale)

    @classmethod
    def check_denoiser_class(cls, name: str) -> None:
        """Refuse a denoiser class this family cannot call, in one sentence (asked before its weights are read)."""
        if name not in cls.denoiser_classes:
            raise WadiInputError(f"The denoiser class {name} is not supported for {cls.name} teachers; expected "
                                 f"{' or '.join(cls.denoiser_classes)}.")

    @classmethod
    def check_denoiser(cls, model: nn.Module) -> None:
        """Refuse a denoiser this family cannot call, in one sentence."""
        cls.check_denoiser_class(type(model).__name__)

    @classmethod
    def check_conditioning(cls, cond: Conditioning) -> None:
        """Refuse a conditioning without the pooled embeddings a family with pooled inputs needs, in one sentence."""
        if cond.pooled is None:
            raise WadiInputError(f"This {cls.name} teacher needs pooled text embeddings; the embedding cache has none.")

    # ---------------------------------------------------------------- condition
    def encode(self, text: TextEncoders, prompts: list[str], device: torch.device) -> Conditioning:
        """Encode ``prompts`` with ``text``'s tokenizers and encoders (on ``device``)."""
        raise NotImplementedError

    @classmethod
    def text_max_length(cls, pipeline_class: str) -> int | None:
        """The prompt length in tokens (None: the tokenizer's own limit)."""
        return None

    @classmethod
    def text_encoder_dtype(cls, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype to load the text encoders in, given the one asked for (bf16 for fp16 when
        :attr:`text_encoders_overflow_fp16`)."""
        if cls.text_encoders_overflow_fp16 and dtype == torch.float16:
            return torch.bfloat16
        return dtype

    # ---------------------------------------------------------------- schedule
    @classmethod
    def schedule(cls, scheduler: Any) -> NoiseSchedule:
        """The noise schedule the teacher runs on, read from its scheduler; a flow family (:attr:`flow_timestep_scale`
        set) refuses any other scheduler, and one with another ``num_train_timesteps``, a VP family a flow-matching
        scheduler, in one sentence."""
        schedule = schedule_from_scheduler(scheduler)
        if cls.flow_timestep_scale is None:
            if isinstance(schedule, FlowMatchSchedule):  # its σ ∈ [0, 1] would reach the denoiser as the timestep
                raise WadiInputError(f"This {cls.name} teacher runs on a DDPM-style scheduler (alphas_cumprod), not "
                                     f"on the flow-matching {type(scheduler).__name__}.")
            return schedule
        if not isinstance(schedule, FlowMatchSchedule):
            raise WadiInputError(f"This {cls.name} teacher runs on a flow-matching scheduler "
                                 "(FlowMatchEulerDiscreteScheduler, or a multistep one with use_flow_sigmas), not "
                                 f"{type(scheduler).__name__}.")
        if schedule.num_train_timesteps != cls.flow_train_timesteps:
            raise WadiInputError(f"This {cls.name} teacher needs a scheduler with num_train_timesteps="
                                 f"{cls.flow_train_timesteps}, not {schedule.num_train_timesteps}.")
        return schedule

    # ---------------------------------------------------------------- load
    @classmethod
    def vae_scale_factor(cls, vae: nn.Module) -> int:
        """Pixels per latent cell along a side: 2^(downsampling blocks) for an ``AutoencoderKL``."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def latent_geometry(cls, root: Path, denoiser: nn.Module, vae: nn.Module | None) -> tuple[int, int, int]:
        """(channels, side, VAE scale) of the latents: the denoiser config's ``in_channels`` and ``sample_size``,
        the VAE's downsampling (8 when the VAE is not loaded)."""
        scale = cls.vae_scale_factor(vae) if vae is not None else 8
        return int(denoiser.config.in_channels), int(denoiser.config.sample_size), scale

    @classmethod
    def claims_source(cls, spec: str) -> bool:
        """Whether ``spec`` (a path or ``name:...``) is a teacher of this family without a ``model_index.json``."""
        return False

    @classmethod
    def load(cls, spec: str, index: dict | None = None, *, load_text_encoders: bool = True, load_vae: bool = True,
             text_encoder_dtype: torch.dtype | None = None) -> Teacher:
        """Load the teacher at ``spec``: by default a diffusers pipeline folder whose ``model_index.json`` is
        ``index``, one component at a time (a process that does not encode prompts skips the text encoders)."""
        root = Path(spec)
        index = index or {}
        pipeline_class = index.get("_class_name", "")
        entry = index.get(cls.denoiser_component)
        if entry and entry[0] is not None and entry[1] is not None:
            cls.check_denoiser_class(str(entry[1]))  # before reading weights of a class the family cannot call
        denoiser = load_component(root, index, cls.denoiser_component)
        cls.check_denoiser(denoiser)
        denoiser.requires_grad_(False)
        schedule = cls.schedule(load_component(root, index, "scheduler"))

        vae = load_component(root, index, "vae", required=False) if load_vae else None
        if vae is not None:
            vae.requires_grad_(False)
        in_channels, latent_size, vae_scale = cls.latent_geometry(root, denoiser, vae)
        family = cls(latent_size * vae_scale, in_channels)
        teacher = Teacher(
            denoiser=denoiser, family=family, schedule=schedule, latent_shape=(in_channels, latent_size, latent_size),
            source=str(root.resolve()), decode=vae_decoder(vae) if vae is not None else None,
            pipeline_class=pipeline_class,
        )
        if load_text_encoders:
            names = list(cls.text_components)
            tokenizers = [load_component(root, index, n.replace("text_encoder", "tokenizer")) for n in names]
            dtype = cls.text_encoder_dtype(text_encoder_dtype)
            encoders = [load_component(root, index, n, dtype=dtype) for n in names]
            for enc in encoders:
                enc.requires_grad_(False).eval()
            text = TextEncoders(family, tokenizers, encoders, max_length=cls.text_max_length(pipeline_class),
                                zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
            teacher.encode_prompts = text.encode
            teacher.text_encoders = text
        return teacher


#: Every teacher family by name, in registration order (the order refusals list them in).
TEACHER_FAMILIES: dict[str, type[TeacherFamily]] = {}

F = TypeVar("F", bound=type[TeacherFamily])


def register_family(cls: F) -> F:
    """Class decorator: add a :class:`TeacherFamily` to :data:`TEACHER_FAMILIES` (names are unique)."""
    if cls.name in TEACHER_FAMILIES:
        raise ValueError(f"A teacher family named {cls.name!r} is registered already.")
    TEACHER_FAMILIES[cls.name] = cls
    return cls


def family_for_pipeline(pipeline_class: str, where: str | Path) -> type[TeacherFamily]:
    """The family that loads ``pipeline_class``; any other class is refused, naming the supported ones."""
    for family in TEACHER_FAMILIES.values():
        if pipeline_class in family.pipeline_classes:
            return family
    supported = [name for family in TEACHER_FAMILIES.values() for name in family.pipeline_classes]
    raise WadiInputError(f"The pipeline class {pipeline_class or '(none)'} in {where} is not supported; "
                         f"wadi-distill supports {', '.join(supported)}.")
