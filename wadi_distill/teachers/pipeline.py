"""Teachers: loading a local diffusers pipeline folder and calling each backbone class with its conditioning.

One adapter class per backbone class turns ``(x_t, t, Conditioning)`` into the denoiser's raw prediction:

- SD1/SD2-like ``UNet2DConditionModel`` (ε or v prediction: that lives in the scheduler config),
- SDXL-like ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled text embeds + time ids),
- PixArt-like ``PixArtTransformer2DModel`` (T5 attention mask, resolution / aspect-ratio conditioning,
  learned-variance channels dropped).

Nothing is fetched from a hub: every component is read with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from wadi_distill.vsd.losses import NoiseSchedule
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
}


# --------------------------------------------------------------------------------------------- conditioning


@dataclass
class Conditioning:
    """Text conditioning of a batch (dim 0 = sample): hidden states, SDXL pooled embeds, T5 attention mask."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (the on-disk cache stores exactly these)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Conditioning":
        return cls(**tensors)

    def __len__(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move to ``device``; floating tensors (not the integer mask) are cast to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self.map(move)

    def select(self, index: torch.Tensor | slice) -> "Conditioning":
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        names = items[0].tensors().keys()
        return Conditioning.from_tensors({k: torch.cat([c.tensors()[k] for c in items]) for k in names})

    def where(self, use_other: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` where ``use_other`` (B,) is True, else self. ``other`` may have batch 1."""
        mine, theirs = self.tensors(), other.tensors()
        out = {}
        for k, v in mine.items():
            o = theirs[k].to(v.device).expand_as(v)
            mask = use_other.to(v.device).view(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(mask, o, v)
        return Conditioning.from_tensors(out)

    def expand(self, batch: int) -> "Conditioning":
        """Repeat a batch-1 conditioning (the null prompt) ``batch`` times."""
        return self.map(lambda t: t.expand(batch, *t.shape[1:]).contiguous())


# --------------------------------------------------------------------------------------------- backbones


class DenoiserCall:
    """Calls a denoiser of one backbone class; returns its raw prediction with the latent's channel count."""

    kind = "base"

    def __init__(self, image_size: int, in_channels: int) -> None:
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)

    def __call__(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError


class UNetCall(DenoiserCall):
    """SD1/SD2-like ``UNet2DConditionModel``: cross-attention on text hidden states only."""

    kind = "unet"

    def __call__(self, model, x_t, t, cond):
        return model(x_t, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)[0]


class SDXLUNetCall(DenoiserCall):
    """SDXL-like UNet: adds pooled text embeds and the (orig size, crop, target size) time ids."""

    kind = "sdxl-unet"

    def time_ids(self, batch: int, device, dtype) -> torch.Tensor:
        size = self.image_size
        ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype)
        return ids.unsqueeze(0).expand(batch, -1)

    def __call__(self, model, x_t, t, cond):
        if cond.pooled is None:
            raise WadiInputError("An SDXL-like teacher needs pooled text embeddings; the embedding cache has none.")
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(x_t.shape[0], x_t.device, cond.pooled.dtype)}
        return model(x_t, t, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=added,
                     return_dict=False)[0]


class PixArtCall(DenoiserCall):
    """PixArt-like ``PixArtTransformer2DModel``: T5 mask, resolution/aspect-ratio conditions, learned sigma cut."""

    kind = "pixart"

    def __call__(self, model, x_t, t, cond):
        batch = x_t.shape[0]
        dtype = cond.encoder_hidden_states.dtype
        size = float(self.image_size)
        added = {
            "resolution": torch.tensor([[size, size]], device=x_t.device, dtype=dtype).expand(batch, -1),
            "aspect_ratio": torch.tensor([[1.0]], device=x_t.device, dtype=dtype).expand(batch, -1),
        }
        timestep = t.expand(batch) if t.ndim == 0 else t
        out = model(x_t, encoder_hidden_states=cond.encoder_hidden_states, timestep=timestep,
                    added_cond_kwargs=added, encoder_attention_mask=cond.attention_mask, return_dict=False)[0]
        return out[:, : self.in_channels]


def denoiser_call_for(model: nn.Module, image_size: int) -> DenoiserCall:
    """Pick the calling convention for ``model`` from its class and config; refuse other classes clearly."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    in_channels = int(getattr(config, "in_channels", 4))
    if name == "UNet2DConditionModel":
        if getattr(config, "addition_embed_type", None) == "text_time":
            return SDXLUNetCall(image_size, in_channels)
        if getattr(config, "addition_embed_type", None) is not None:
            raise WadiInputError(f"A UNet with addition_embed_type={config.addition_embed_type!r} is not supported.")
        return UNetCall(image_size, in_channels)
    if name == "PixArtTransformer2DModel":
        return PixArtCall(image_size, in_channels)
    raise WadiInputError(
        f"The denoiser class {name} is not supported; wadi-distill trains UNet2DConditionModel and "
        "PixArtTransformer2DModel teachers."
    )


# --------------------------------------------------------------------------------------------- text encoders


class TextEncoders:
    """The pipeline's tokenizer(s) and text encoder(s); ``encode`` turns prompts into :class:`Conditioning`.

    The embeddings equal diffusers' ``encode_prompt`` (tests/test_conditioning.py: SD and SDXL bit for bit,
    PixArt's T5 within float rounding). Ours is kept because ``encode_prompt`` needs a whole pipeline object
    (every component loaded, while only the encoding process should hold the text encoders), and because the
    embedding cache runs the null prompt through the same call as every other prompt.
    """

    def __init__(self, family: str, tokenizers: list[Any], encoders: list[nn.Module], *,
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

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int | None):
        length = max_length or getattr(tokenizer, "model_max_length", 77)
        if length is None or length > 100_000:  # tokenizers without a limit report a huge sentinel
            length = 77
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode ``prompts`` (an empty string is the null prompt) on the encoders' device, as fp32 on CPU."""
        device = next(self.encoders[0].parameters()).device
        if self.family == "sd":
            tokens = self._tokenize(self.tokenizers[0], prompts, self.max_length)
            hidden = self.encoders[0](tokens.input_ids.to(device), return_dict=True).last_hidden_state
            cond = Conditioning(hidden)
        elif self.family == "sdxl":
            states, pooled = [], None
            for tokenizer, encoder in zip(self.tokenizers, self.encoders):
                tokens = self._tokenize(tokenizer, prompts, self.max_length)
                out = encoder(tokens.input_ids.to(device), output_hidden_states=True, return_dict=True)
                states.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds") and out.text_embeds is not None:
                    pooled = out.text_embeds
            if pooled is None:
                raise WadiInputError("The SDXL pipeline's second text encoder gives no pooled text embeddings.")
            cond = Conditioning(torch.cat(states, dim=-1), pooled=pooled)
            if self.zeros_for_empty_prompt:
                empty = torch.tensor([p == "" for p in prompts], device=device)
                cond = cond.where(empty, cond.map(torch.zeros_like))
        elif self.family == "pixart":
            tokens = self._tokenize(self.tokenizers[0], prompts, self.max_length or 120)
            mask = tokens.attention_mask.to(device)
            hidden = self.encoders[0](tokens.input_ids.to(device), attention_mask=mask, return_dict=True)
            cond = Conditioning(hidden.last_hidden_state, attention_mask=mask)
        else:  # pragma: no cover - families are fixed above
            raise WadiInputError(f"Unknown text-encoder family {self.family!r}.")
        return cond.to("cpu", torch.float32)

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
    call: DenoiserCall
    schedule: NoiseSchedule
    latent_shape: tuple[int, int, int]
    source: str
    family: str
    encode_prompts: Callable[[list[str]], Conditioning] | None = None
    free_text_encoders: Callable[[], None] = lambda: None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [0, 1]
    null_prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

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


_STEM = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_PLAIN_WEIGHTS = re.compile(rf"^{_STEM}(?:-\d+-of-\d+)?\.(?:safetensors|bin)$|^{_STEM}\.(?:safetensors|bin)\.index\.json$")
_VARIANT_WEIGHTS = re.compile(rf"^{_STEM}(?:-\d+-of-\d+)?\.(?P<a>[^.]+)\.(?:safetensors|bin)$"
                              rf"|^{_STEM}\.(?:safetensors|bin)\.index\.(?P<b>[^.]+)\.json$")


def weights_variant(folder: Path) -> str | None:
    """The variant (``fp16``, ...) to load from a component folder that holds only variant weight files.

    ``from_pretrained`` reads the plain ``diffusion_pytorch_model.safetensors`` unless told ``variant=``; folders
    that ship only ``diffusion_pytorch_model.fp16.safetensors`` (common for SDXL) need it named. ``None`` when
    plain weights are there (they are preferred) or no weights are found at all.
    """
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(_PLAIN_WEIGHTS.match(n) for n in names):
        return None
    for name in names:
        match = _VARIANT_WEIGHTS.match(name)
        if match:
            return match.group("a") or match.group("b")
    return None


def _read_model_index(root: Path) -> dict:
    if not root.exists():
        raise WadiInputError(f"The teacher folder {root} does not exist.")
    if not root.is_dir():
        raise WadiInputError(f"The teacher {root} is a file; give a diffusers pipeline folder (with model_index.json).")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise WadiInputError(f"{root} is not a diffusers pipeline folder: it has no model_index.json.")
    return read_json(index_path)


def _load_component(root: Path, index: dict, name: str, *, required: bool = True,
                    dtype: torch.dtype | None = None):
    """Load one pipeline component with its library's ``from_pretrained(local_files_only=True)``.

    Components are loaded one by one, not with ``DiffusionPipeline.from_pretrained``: a process that does not
    encode prompts skips the text encoders, a variant (fp16-only folders) is detected per folder, and every
    failure names the component in one sentence.
    """
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        if required:
            raise WadiInputError(f"The pipeline in {root} has no {name!r} component.")
        return None
    library, class_name = entry
    folder = root / name
    if not folder.is_dir():
        raise WadiInputError(f"The pipeline in {root} lists {name!r} but the folder {folder} is missing.")
    if library == "diffusers":
        import diffusers as lib
    elif library == "transformers":
        import transformers as lib
    else:
        raise WadiInputError(f"The {name!r} component of {root} comes from {library!r}, which is not supported.")
    cls = getattr(lib, class_name, None)
    if cls is None:
        raise WadiInputError(f"The {name!r} component of {root} is a {class_name}, unknown to {library}.")
    try:
        if name.startswith("tokenizer"):
            from transformers import AutoTokenizer

            try:
                return cls.from_pretrained(folder, local_files_only=True)
            except Exception:
                return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kwargs: dict[str, Any] = {"local_files_only": True}
        variant = weights_variant(folder)
        if variant is not None:
            kwargs["variant"] = variant
        if dtype is not None and library == "transformers":
            kwargs["dtype"] = dtype
        return cls.from_pretrained(folder, **kwargs)
    except WadiInputError:
        raise
    except Exception as exc:  # corrupt or incomplete component: one sentence, the cause chained
        raise WadiInputError(f"Could not load the {name!r} component from {folder}: {exc}".rstrip(".") + ".") from exc


def _vae_decoder(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        vae.to(latents.device)
        images = vae.decode(latents.to(param.dtype) / scaling + shift, return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    return decode


@contextlib.contextmanager
def _library_bars(enabled: bool) -> Iterator[None]:
    """transformers' and diffusers' own loading bars ("Loading weights", "Loading checkpoint shards") on or off for
    the duration, restored afterwards (they are process-wide switches of those libraries)."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in before:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in before:
            if was:
                lib.enable_progress_bar()


def load_teacher(path: str | Path, *, load_text_encoders: bool = True, load_vae: bool = True,
                 text_encoder_dtype: torch.dtype | None = None, progress: bool = True) -> Teacher:
    """Load a local diffusers pipeline folder (or ``builtin:NAME``) as a :class:`Teacher`, without network.

    Supported: StableDiffusionPipeline (SD1.x, SD2.x incl. v-prediction), StableDiffusionXLPipeline,
    PixArtAlphaPipeline / PixArtSigmaPipeline. Any other pipeline class is refused with a clear message.
    ``text_encoder_dtype`` loads the text encoders in half precision (T5-XXL is 19 GB in fp32); fp16 is
    replaced by bf16 for T5, whose activations overflow fp16. ``progress=False`` silences the loading bars
    transformers and diffusers print themselves.
    """
    with _library_bars(progress):
        return _load_teacher(path, load_text_encoders=load_text_encoders, load_vae=load_vae,
                             text_encoder_dtype=text_encoder_dtype)


def _load_teacher(path: str | Path, *, load_text_encoders: bool, load_vae: bool,
                  text_encoder_dtype: torch.dtype | None) -> Teacher:
    spec = str(path)
    if spec.startswith("builtin:"):
        return load_builtin_teacher(spec)
    root = Path(path)
    if root.is_dir() and not (root / "model_index.json").exists() and (root / "digits_teacher.json").is_file():
        return load_builtin_teacher(spec)  # a folder written by `wadi-distill train-teacher`
    index = _read_model_index(root)
    pipeline_class = index.get("_class_name", "")
    family = SUPPORTED_PIPELINES.get(pipeline_class)
    if family is None:
        raise WadiInputError(
            f"The pipeline class {pipeline_class or '(none)'} in {root} is not supported; wadi-distill supports "
            f"{', '.join(SUPPORTED_PIPELINES)}."
        )
    denoiser_name = "transformer" if family == "pixart" else "unet"
    denoiser = _load_component(root, index, denoiser_name)
    denoiser.requires_grad_(False)
    scheduler = _load_component(root, index, "scheduler")
    schedule = NoiseSchedule.from_scheduler(scheduler)

    vae = _load_component(root, index, "vae", required=False) if load_vae else None
    vae_scale = 8
    if vae is not None:
        vae.requires_grad_(False)
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = int(denoiser.config.sample_size)
    image_size = latent_size * vae_scale
    in_channels = int(denoiser.config.in_channels)
    call = denoiser_call_for(denoiser, image_size)

    teacher = Teacher(
        denoiser=denoiser, call=call, schedule=schedule, latent_shape=(in_channels, latent_size, latent_size),
        source=str(root.resolve()), family=family, decode=_vae_decoder(vae) if vae is not None else None,
        extra={"pipeline_class": pipeline_class, "image_size": image_size},
    )
    if load_text_encoders:
        names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        tokenizers = [_load_component(root, index, n.replace("text_encoder", "tokenizer")) for n in names]
        if family == "pixart" and text_encoder_dtype == torch.float16:
            text_encoder_dtype = torch.bfloat16
        encoders = [_load_component(root, index, n, dtype=text_encoder_dtype) for n in names]
        for enc in encoders:
            enc.requires_grad_(False).eval()
        text = TextEncoders(family, tokenizers, encoders,
                            max_length=300 if pipeline_class == "PixArtSigmaPipeline" else None,
                            zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
        teacher.encode_prompts = text.encode
        teacher.free_text_encoders = text.free
        teacher.extra["text_encoders"] = text
    return teacher


def load_builtin_teacher(spec: str) -> Teacher:
    """Wrap the project's small demo model (``builtin:digits`` or a ``train-teacher`` folder) as a :class:`Teacher`."""
    try:
        from wadi_distill.builtin.digits.model import load_digits as load_builtin
    except ImportError as exc:
        raise WadiInputError(f"The built-in teacher {spec!r} is not available in this installation.") from exc
    builtin = load_builtin(spec)
    unet = builtin.unet
    unet.requires_grad_(False)
    schedule = NoiseSchedule.from_scheduler(builtin.scheduler)
    size, channels = int(builtin.image_size), int(builtin.channels)

    def encode(prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            return Conditioning(builtin.encode_prompts(list(prompts)).float().cpu())

    def decode(samples: torch.Tensor) -> torch.Tensor:
        return ((samples.float() + 1) / 2).clamp(0, 1)

    return Teacher(
        denoiser=unet, call=denoiser_call_for(unet, size), schedule=schedule, latent_shape=(channels, size, size),
        source=spec, family="builtin", encode_prompts=encode, decode=decode,
        null_prompt=getattr(builtin, "null_prompt", ""), extra={"builtin": builtin, "image_size": size},
    )
