"""The teacher families wadi-distill trains on, one class each, registered by name.

- :class:`StableDiffusion`: SD1.x/SD2.x ``UNet2DConditionModel`` (ε or v prediction: that lives in the scheduler
  config), cross-attention on CLIP hidden states only;
- :class:`StableDiffusionXL`: SDXL-like UNet with ``addition_embed_type="text_time"`` (two text encoders, pooled
  text embeds + time ids);
- :class:`PixArt`: ``PixArtTransformer2DModel`` (T5 attention mask, resolution / aspect-ratio conditioning,
  learned-variance channels dropped);
- :class:`StableDiffusion3`: SD3/SD3.5 ``SD3Transformer2DModel`` (flow matching; two CLIP encoders and T5, pooled
  projections, σ·1000 as the timestep);
- :class:`BuiltinDigits`: the project's small demo world (``builtin:digits`` or a ``train-teacher`` folder).

A new family (e.g. another transformer) is one subclass of :class:`~wadi_distill.teachers.teacher.TeacherFamily`
here with ``@register_family``: its pipeline classes, denoiser component, ``__call__`` and ``encode`` (and, if it
runs on another noise schedule, that schedule's class in :mod:`wadi_distill.schedules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from wadi_distill.schedules import FlowMatchSchedule
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.teachers.teacher import Teacher, TeacherFamily, TextEncoders, register_family
from wadi_probe.errors import WadiInputError

__all__ = ["StableDiffusion", "StableDiffusionXL", "PixArt", "StableDiffusion3", "BuiltinDigits"]


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
    #: the T5 token count of ``StableDiffusion3Pipeline``'s ``max_sequence_length`` default
    t5_max_length: ClassVar[int] = 256
    #: T5's width (the transformer's ``joint_attention_dim``): the zeros in its place when ``text_encoder_3`` is null
    joint_attention_dim: int | None = None

    def __call__(self, model, x_t, t, cond):
        if cond.pooled is None:
            raise WadiInputError("An SD3 teacher needs pooled text embeddings; the embedding cache has none.")
        timestep = (t.expand(x_t.shape[0]) if t.ndim == 0 else t) * 1000.0
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
    def text_encoder_dtype(cls, dtype):
        return PixArt.text_encoder_dtype(dtype)  # the same T5

    @classmethod
    def schedule(cls, scheduler):
        """The scheduler's shifted flow schedule with u drawn logit-normal(0, 1), as SD3 was trained."""
        schedule = super().schedule(scheduler)
        if not isinstance(schedule, FlowMatchSchedule):
            raise WadiInputError(f"An SD3 teacher needs a flow-matching scheduler, not {type(scheduler).__name__}.")
        return schedule.with_logit_normal()

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
