"""The teacher families wadi-distill trains on, one class each, registered by name.

- :class:`StableDiffusion`: SD1.x/SD2.x ``UNet2DConditionModel`` (ε or v prediction: that lives in the scheduler
  config), cross-attention on CLIP hidden states only;
- :class:`StableDiffusionXL`: SDXL-like UNet with ``addition_embed_type="text_time"`` (two text encoders, pooled
  text embeds + time ids);
- :class:`PixArt`: ``PixArtTransformer2DModel`` (T5 attention mask, resolution / aspect-ratio conditioning,
  learned-variance channels dropped);
- :class:`BuiltinDigits`: the project's small demo world (``builtin:digits`` or a ``train-teacher`` folder);
- :class:`Flux`: Flux.1 ``FluxTransformer2DModel`` (CLIP pooled + T5 states, latents packed 2×2 into tokens, the
  embedded guidance of FLUX.1-dev, a flow-matching schedule with the dynamic shift of its token count).

A new family (e.g. another transformer) is one subclass of :class:`~wadi_distill.teachers.teacher.TeacherFamily`
here with ``@register_family``: its pipeline classes, denoiser component, ``__call__`` and ``encode`` (and, if it
runs on another noise schedule, that schedule's class in :mod:`wadi_distill.schedules`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.teachers.teacher import Teacher, TeacherFamily, TextEncoders, register_family
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

__all__ = ["StableDiffusion", "StableDiffusionXL", "PixArt", "BuiltinDigits", "Flux"]


@register_family
class StableDiffusion(TeacherFamily):
    """SD1/SD2-like ``UNet2DConditionModel``: cross-attention on the CLIP text encoder's last hidden states."""

    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    @classmethod
    def check_denoiser(cls, model):
        super().check_denoiser(model)
        extra = getattr(model.config, "addition_embed_type", None)
        if extra is not None:
            raise WadiInputError(f"A UNet with addition_embed_type={extra!r} is not supported in a {cls.name} "
                                 "teacher.")

    def __call__(self, model, x_t, t, cond):
        return model(x_t, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)[0]

    def encode(self, text, prompts, device):
        tokens = text.tokenize(text.tokenizers[0], prompts, text.max_length)
        hidden = text.encoders[0](tokens.input_ids.to(device), return_dict=True).last_hidden_state
        return Conditioning(hidden)


@register_family
class StableDiffusionXL(TeacherFamily):
    """SDXL-like UNet: the two encoders' penultimate states, pooled text embeds and (orig, crop, target) time ids."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_components = ("text_encoder", "text_encoder_2")

    @classmethod
    def check_denoiser(cls, model):
        super().check_denoiser(model)
        extra = getattr(model.config, "addition_embed_type", None)
        if extra != "text_time":
            raise WadiInputError(f"An {cls.name} teacher needs a UNet with addition_embed_type='text_time', not "
                                 f"{extra!r}.")

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

    def encode(self, text, prompts, device):
        states, pooled = [], None
        for tokenizer, encoder in zip(text.tokenizers, text.encoders):
            tokens = text.tokenize(tokenizer, prompts, text.max_length)
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True, return_dict=True)
            states.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds") and out.text_embeds is not None:
                pooled = out.text_embeds
        if pooled is None:
            raise WadiInputError("The SDXL pipeline's second text encoder gives no pooled text embeddings.")
        cond = Conditioning(torch.cat(states, dim=-1), pooled=pooled)
        if text.zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=device)
            cond = cond.where(empty, cond.map(torch.zeros_like))
        return cond


@register_family
class PixArt(TeacherFamily):
    """PixArt-α/Σ ``PixArtTransformer2DModel``: T5 states with their mask, resolution and aspect-ratio conditions."""

    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser_component = "transformer"
    denoiser_classes = ("PixArtTransformer2DModel",)

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
        return out[:, : self.in_channels]  # learned-variance channels dropped

    def encode(self, text, prompts, device):
        tokens = text.tokenize(text.tokenizers[0], prompts, text.max_length)
        mask = tokens.attention_mask.to(device)
        hidden = text.encoders[0](tokens.input_ids.to(device), attention_mask=mask, return_dict=True)
        return Conditioning(hidden.last_hidden_state, attention_mask=mask)

    @classmethod
    def text_max_length(cls, pipeline_class):
        return 300 if pipeline_class == "PixArtSigmaPipeline" else 120

    @classmethod
    def text_encoder_dtype(cls, dtype):
        return torch.bfloat16 if dtype == torch.float16 else dtype  # T5's activations overflow fp16


@register_family
class BuiltinDigits(StableDiffusion):
    """The project's small demo model (``builtin:digits`` or a ``train-teacher`` folder): an SD-like UNet on 8×8
    pixels, its own prompt encoder, no VAE; called like an SD UNet."""

    name = "builtin"
    pipeline_classes = ()
    weights_on_disk = False  # the merged student is written from memory

    @classmethod
    def claims_source(cls, spec):
        if spec.startswith("builtin:"):
            return True
        root = Path(spec)  # a folder written by `wadi-distill train-teacher`
        return root.is_dir() and not (root / "model_index.json").exists() and (root / "digits_teacher.json").is_file()

    @classmethod
    def load(cls, spec, index=None, *, load_text_encoders=True, load_vae=True, text_encoder_dtype=None) -> Teacher:
        try:
            from wadi_distill.builtin.digits.model import load_digits
        except ImportError as exc:
            raise WadiInputError(f"The built-in teacher {spec!r} is not available in this installation.") from exc
        builtin = load_digits(spec)
        unet = builtin.unet
        unet.requires_grad_(False)
        cls.check_denoiser(unet)
        size, channels = int(builtin.image_size), int(builtin.channels)

        def encode(prompts: list[str]) -> Conditioning:
            with torch.no_grad():
                return Conditioning(builtin.encode_prompts(list(prompts)).float().cpu())

        def decode(samples: torch.Tensor) -> torch.Tensor:
            return ((samples.float() + 1) / 2).clamp(0, 1)

        return Teacher(
            denoiser=unet, family=cls(size, channels), schedule=cls.schedule(builtin.scheduler),
            latent_shape=(channels, size, size), source=spec, encode_prompts=encode, decode=decode,
            null_prompt=getattr(builtin, "null_prompt", ""),
            default_prompts=list(getattr(builtin, "class_prompts", [])) or None, builtin=builtin,
        )

    def encode(self, text: TextEncoders, prompts, device):
        raise WadiInputError("The built-in teacher encodes its prompts with its own model, not with text encoders.")


@register_family
class Flux(TeacherFamily):
    """Flux.1 ``FluxTransformer2DModel`` (dev: a guidance embedding; schnell: none) as ``FluxPipeline`` runs it.

    Latents stay (B, C, H, W) everywhere else; the call packs them 2×2 into tokens (:meth:`pack`, the math of the
    pipeline's ``_pack_latents``, with its ``_prepare_latent_image_ids`` positions) and unpacks the prediction
    (:meth:`unpack`, its ``_unpack_latents``); the pipeline module itself is not imported for three reshapes. The
    text tokens' positions are zeros (as ``encode_prompt`` gives them) and the timestep is σ (the pipeline passes
    t/1000). The conditioning is T5's last hidden states (512 tokens, the pipeline's default
    ``max_sequence_length``) and CLIP's pooled output.

    Guidance: FLUX.1-dev is guidance-distilled; its embedded guidance is the real score's guidance
    (``--guidance``, default 3.5 as the pipeline's). The fake score gets the same value, so that its prediction
    is compared with the teacher's at the same inputs (at the start the two are the same model); the student
    always runs at :attr:`student_guidance` (3.5, the pipeline's default ``guidance_scale``), so the exported
    student samples in the stock ``FluxPipeline`` with one step and its default guidance. Classifier-free
    guidance on top of the embedding is refused for dev (the run's ``--cfg`` must be 1, its default here).
    """

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_component = "transformer"
    denoiser_classes = ("FluxTransformer2DModel",)
    text_components = ("text_encoder", "text_encoder_2")
    default_cfg = 1.0
    #: the real score's embedded guidance when none is given, and the student's always (FluxPipeline's default)
    default_guidance = 3.5
    student_guidance = 3.5
    #: T5 prompt length in tokens (FluxPipeline's default ``max_sequence_length``)
    t5_length = 512

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, H/2·W/2, 4C): each 2×2 patch one token, channels outermost (``_pack_latents``)."""
        b, c, h, w = latents.shape
        patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of :meth:`pack` for latents of ``height`` × ``width`` (``_unpack_latents``)."""
        b, _, channels = tokens.shape
        patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(b, channels // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """(H/2·W/2, 3) positions of the packed tokens: (0, row, column) (``_prepare_latent_image_ids``)."""
        rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        return ids.to(device=device, dtype=dtype)

    def __call__(self, model, x_t, t, cond):
        if cond.pooled is None:
            raise WadiInputError("A Flux teacher needs pooled CLIP embeddings; the embedding cache has none.")
        batch, _, height, width = x_t.shape
        tokens = self.pack(x_t)
        img_ids = self.image_ids(height, width, x_t.device, x_t.dtype)
        states = cond.encoder_hidden_states
        txt_ids = torch.zeros(states.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        timestep = (t.expand(batch) if t.ndim == 0 else t).to(x_t.dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = model(hidden_states=tokens, encoder_hidden_states=states, pooled_projections=cond.pooled,
                    timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return self.unpack(out, height, width)

    def for_role(self, role):
        if role != "student" or self.guidance is None or self.guidance == self.student_guidance:
            return self
        student = copy.copy(self)
        student.guidance = self.student_guidance
        return student

    def encode(self, text, prompts, device):
        (clip_tokenizer, t5_tokenizer), (clip, t5) = text.tokenizers, text.encoders
        ids = text.tokenize(clip_tokenizer, prompts, None).input_ids  # the CLIP tokenizer's own limit (77)
        pooled = clip(ids.to(device), output_hidden_states=False).pooler_output
        ids = text.tokenize(t5_tokenizer, prompts, text.max_length).input_ids
        hidden = t5(ids.to(device), output_hidden_states=False)[0]
        return Conditioning(hidden, pooled=pooled)

    @classmethod
    def text_max_length(cls, pipeline_class):
        return cls.t5_length

    @classmethod
    def text_encoder_dtype(cls, dtype):
        return PixArt.text_encoder_dtype(dtype)  # the same T5 as PixArt's

    @classmethod
    def latent_geometry(cls, root, denoiser, vae):
        """16 latent channels (the transformer's ``in_channels`` / 4, packed 2×2) and the side of the VAE's
        ``sample_size`` (1024 pixels for the releases: the pipeline's default 128·8), read from ``vae/config.json``
        when the VAE itself is not loaded."""
        path = Path(root) / "vae" / "config.json"
        config = dict(vae.config) if vae is not None else read_json(path) if path.is_file() else {}
        scale = 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)
        side = int(config.get("sample_size", 1024)) // scale
        channels = int(denoiser.config.in_channels) // 4
        if int(config.get("latent_channels", channels)) != channels:
            raise WadiInputError(f"The Flux transformer in {root} takes {channels} latent channels (in_channels / 4) "
                                 f"but its VAE makes {config['latent_channels']}.")
        if side % 2:
            raise WadiInputError(f"The Flux latents of {root} are {side} wide, which 2×2 packing cannot split.")
        return channels, side, scale

    @classmethod
    def load(cls, spec, index=None, *, load_text_encoders=True, load_vae=True, text_encoder_dtype=None):
        teacher = super().load(spec, index, load_text_encoders=load_text_encoders, load_vae=load_vae,
                               text_encoder_dtype=text_encoder_dtype)
        if teacher.denoiser.config.guidance_embeds:
            teacher.family.guidance = cls.default_guidance
        side = teacher.latent_shape[1]
        teacher.schedule = teacher.schedule.with_image_tokens((side // 2) * (side // 2))  # Flux's dynamic shift
        return teacher
