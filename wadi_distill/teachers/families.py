"""The teacher families wadi-distill trains on, one class each, registered by name.

- :class:`StableDiffusion`: SD1.x/SD2.x ``UNet2DConditionModel`` (ε or v prediction: that lives in the scheduler
  config), cross-attention on CLIP hidden states only;
- :class:`StableDiffusionXL`: SDXL-like UNet with ``addition_embed_type="text_time"`` (two text encoders, pooled
  text embeds + time ids);
- :class:`PixArt`: ``PixArtTransformer2DModel`` (T5 attention mask, resolution / aspect-ratio conditioning,
  learned-variance channels dropped);
- :class:`StableDiffusion3`: SD3/SD3.5 ``SD3Transformer2DModel`` (flow matching; two CLIP encoders and T5, pooled
  projections, σ·1000 as the timestep);
- :class:`Sana`: ``SanaTransformer2DModel`` on the flow-matching schedule (Gemma2 states with their mask, the
  pipeline's complex human instruction, ``AutoencoderDC`` latents);
- :class:`BuiltinDigits`: the project's small demo world (``builtin:digits`` or a ``train-teacher`` folder);
- :class:`Flux`: Flux.1 ``FluxTransformer2DModel`` (CLIP pooled + T5 states, latents packed 2×2 into tokens, the
  embedded guidance of FLUX.1-dev, a flow-matching schedule with the dynamic shift of its token count).

A new family (e.g. another transformer) is one subclass of :class:`~wadi_distill.teachers.teacher.TeacherFamily`
here with ``@register_family``: its pipeline classes, denoiser component, ``__call__`` and ``encode`` (and, if it
runs on another noise schedule, that schedule's class in :mod:`wadi_distill.schedules`). A flow-matching family
sets ``flow_timestep_scale`` (its scheduler is then checked, and ``flow_timesteps`` converts σ for its denoiser);
one whose text encoders include T5 or Gemma sets ``text_encoders_overflow_fp16``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch

from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.teachers.teacher import Teacher, TeacherFamily, TextEncoders, batch_timesteps, register_family
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

__all__ = ["StableDiffusion", "StableDiffusionXL", "PixArt", "StableDiffusion3", "BuiltinDigits", "Sana", "Flux"]


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
        self.check_conditioning(cond)
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
    text_encoders_overflow_fp16 = True  # T5

    def __call__(self, model, x_t, t, cond):
        batch = x_t.shape[0]
        dtype = cond.encoder_hidden_states.dtype
        size = float(self.image_size)
        added = {
            "resolution": torch.tensor([[size, size]], device=x_t.device, dtype=dtype).expand(batch, -1),
            "aspect_ratio": torch.tensor([[1.0]], device=x_t.device, dtype=dtype).expand(batch, -1),
        }
        out = model(x_t, encoder_hidden_states=cond.encoder_hidden_states, timestep=batch_timesteps(t, batch),
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


@register_family
class StableDiffusion3(TeacherFamily):
    """SD3/SD3.5 ``SD3Transformer2DModel`` on a flow-matching schedule, conditioned as ``StableDiffusion3Pipeline``
    does: the two CLIP encoders' penultimate states (concatenated, zero-padded to T5's width) followed by T5's
    last states, and the CLIP pooled embeddings concatenated as ``pooled_projections``.

    A folder whose ``model_index.json`` lists ``text_encoder_3`` as null (allowed by the pipeline, e.g. to save
    T5's memory) is conditioned with zeros in T5's place, as the pipeline does; a folder that does not list it at
    all is refused like any missing component. The timestep the model takes is σ·1000 (σ ∈ [0, 1]).
    """

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_component = "transformer"
    denoiser_classes = ("SD3Transformer2DModel",)
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_encoders_overflow_fp16 = True  # T5
    flow_timestep_scale = 1000.0  # the pipeline feeds the scheduler's timesteps, σ·1000
    #: the T5 token count of ``StableDiffusion3Pipeline``'s ``max_sequence_length`` default
    t5_max_length: ClassVar[int] = 256
    #: T5's width (the transformer's ``joint_attention_dim``): the zeros in its place when ``text_encoder_3`` is null
    joint_attention_dim: int | None = None

    def __call__(self, model, x_t, t, cond):
        self.check_conditioning(cond)
        timestep = self.flow_timesteps(t, x_t.shape[0])
        return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=cond.pooled, return_dict=False)[0]

    def encode(self, text, prompts, device):
        clip_length = getattr(text.tokenizers[0], "model_max_length", 77)  # the pipeline's, for both CLIPs
        states, pooled = [], []
        for tokenizer, encoder in zip(text.tokenizers[:2], text.encoders[:2]):
            tokens = text.tokenize(tokenizer, prompts, clip_length)
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True, return_dict=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        if len(text.encoders) > 2:
            tokens = text.tokenize(text.tokenizers[2], prompts, self.t5_max_length)
            t5 = text.encoders[2](tokens.input_ids.to(device), return_dict=True).last_hidden_state
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_max_length, int(self.joint_attention_dim or 0))
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip.to(t5.dtype), t5], dim=-2), pooled=torch.cat(pooled, dim=-1))

    @classmethod
    def schedule(cls, scheduler):
        """The scheduler's shifted flow schedule with u drawn logit-normal(0, 1), as SD3 was trained."""
        return super().schedule(scheduler).with_logit_normal()

    @classmethod
    def load(cls, spec, index=None, *, load_text_encoders=True, load_vae=True, text_encoder_dtype=None) -> Teacher:
        """The common loading; a ``text_encoder_3`` listed as null loads the two CLIP encoders only, and the family
        keeps the transformer's ``joint_attention_dim`` for the zeros in T5's place."""
        index = dict(index or {})
        entry = index.get("text_encoder_3")
        without_t5 = isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None
        family = _StableDiffusion3WithoutT5 if without_t5 else cls
        teacher = super(StableDiffusion3, family).load(spec, index, load_text_encoders=load_text_encoders,
                                                       load_vae=load_vae, text_encoder_dtype=text_encoder_dtype)
        teacher.family.joint_attention_dim = int(teacher.denoiser.config.joint_attention_dim)
        return teacher


class _StableDiffusion3WithoutT5(StableDiffusion3):
    """An SD3 folder whose ``text_encoder_3`` is null: the two CLIP encoders only, zeros in T5's place."""

    text_components = ("text_encoder", "text_encoder_2")


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
class Sana(TeacherFamily):
    """SANA ``SanaTransformer2DModel``: a flow-matching DiT on ``AutoencoderDC`` latents, cross-attention on Gemma2
    states with their attention mask.

    Prompts are encoded as ``SanaPipeline`` does by default: lower-cased and stripped, the pipeline's complex human
    instruction put in front of every prompt (its tokens are encoded too, then all but the first and the last
    ``max_sequence_length − 1`` positions dropped), 300 positions, padding on the right. The null prompt ``""`` is
    encoded as the pipeline encodes its negative prompt: without the instruction. The denoiser's timestep is
    σ·1000·``timestep_scale`` (σ in [0, 1], as ``SanaPipeline`` feeds the scheduler's timesteps).
    """

    name = "sana"
    pipeline_classes = ("SanaPipeline",)
    denoiser_component = "transformer"
    denoiser_classes = ("SanaTransformer2DModel",)
    text_encoders_overflow_fp16 = True  # Gemma2
    #: the timestep the transformer takes at σ = 1 (before its own ``timestep_scale``)
    flow_timestep_scale = 1000.0

    @classmethod
    def check_denoiser(cls, model):
        super().check_denoiser(model)
        if getattr(model.config, "guidance_embeds", False):
            raise WadiInputError("A SANA transformer with guidance_embeds=True (guidance-distilled) is not supported "
                                 "in a sana teacher.")

    def __call__(self, model, x_t, t, cond):
        scale = float(getattr(model.config, "timestep_scale", 1.0) or 1.0)
        timestep = self.flow_timesteps(t, x_t.shape[0], scale)
        out = model(x_t, encoder_hidden_states=cond.encoder_hidden_states, timestep=timestep,
                    encoder_attention_mask=cond.attention_mask, return_dict=False)[0]
        return out[:, : self.in_channels]  # learned-variance channels, if any, dropped

    @staticmethod
    def complex_human_instruction() -> list[str]:
        """The instruction ``SanaPipeline.__call__`` puts in front of every prompt by default (read from the
        installed diffusers, so the two stay the same)."""
        import inspect

        from diffusers import SanaPipeline

        return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)

    def encode(self, text, prompts, device):
        tokenizer, encoder = text.tokenizers[0], text.encoders[0]
        tokenizer.padding_side = "right"  # as SanaPipeline sets it; the select below assumes it
        length = int(text.max_length or self.text_max_length("SanaPipeline"))
        instruction = "\n".join(self.complex_human_instruction())
        hidden = mask = None
        for null in (False, True):
            rows = [i for i, p in enumerate(prompts) if (p == "") == null]
            if not rows:
                continue
            texts = [prompts[i].lower().strip() for i in rows]
            total = length
            if not null:
                texts = [instruction + t for t in texts]
                total = len(tokenizer.encode(instruction)) + length - 2
            tokens = tokenizer(texts, padding="max_length", max_length=total, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
            keep = [0, *range(total - length + 1, total)]  # the first token and the last length − 1
            part_mask = tokens.attention_mask.to(device)
            part = encoder(tokens.input_ids.to(device), attention_mask=part_mask, return_dict=True).last_hidden_state
            part, part_mask = part[:, keep], part_mask[:, keep]
            if hidden is None:
                hidden = part.new_zeros(len(prompts), *part.shape[1:])
                mask = part_mask.new_zeros(len(prompts), *part_mask.shape[1:])
            hidden[rows], mask[rows] = part, part_mask
        return Conditioning(hidden, attention_mask=mask)

    @classmethod
    def text_max_length(cls, pipeline_class):
        return 300  # SanaPipeline's max_sequence_length

    @classmethod
    def vae_scale_factor(cls, vae):
        """``AutoencoderDC`` halves the side once per encoder stage after the first (32 for SANA's DC-AE f32)."""
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


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
    text_encoders_overflow_fp16 = True  # T5
    flow_timestep_scale = 1.0  # the pipeline passes t/1000 = σ
    default_cfg = 1.0
    #: the real score's embedded guidance when none is given, and the student's always (FluxPipeline's default)
    default_guidance = 3.5
    student_guidance = 3.5
    #: T5 prompt length in tokens (FluxPipeline's default ``max_sequence_length``)
    t5_max_length: ClassVar[int] = 512

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
        self.check_conditioning(cond)
        batch, _, height, width = x_t.shape
        tokens = self.pack(x_t)
        img_ids = self.image_ids(height, width, x_t.device, x_t.dtype)
        states = cond.encoder_hidden_states
        txt_ids = torch.zeros(states.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        timestep = self.flow_timesteps(t, batch).to(x_t.dtype)
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
        return cls.t5_max_length

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
