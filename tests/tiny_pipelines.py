"""Tiny local diffusers pipeline folders (SD1-, SD2-v-, SDXL-, PixArt-, SD3/SD3.5-, SANA-, Flux.1-like) with random
weights, no downloads.

The real-world variants the suite uses (``make_pipeline(..., legacy_config=True, variant="fp16")``):

- ``legacy_config``: the UNet's and the scheduler's ``config.json`` hold only the keys the original SD1.5 release
  had (diffusers fills the rest with defaults and records them in ``_use_default_values``, a list whose order
  follows Python's hash seed);
- ``variant="fp16"``: every component saved only as ``*.fp16.safetensors`` in fp16 (as many SDXL releases ship);
- ``hub_snapshot``: the layout of a Hugging Face cache (``models--org--name/snapshots/<commit>/`` whose files are
  symbolic links into ``blobs/``); the returned path is the snapshot folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "the", "cat", "dog", "photo", "of", "red", "blue", "green", "house", "tree", "car", "on",
         "in", "sky", "digit", "zero", "one", "two", "three", "big", "small", "drawing", "painting"]


def make_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A word-level fast tokenizer with a fixed vocabulary, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)
    fast.save_pretrained(folder)


def _clip(projection: bool, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16)


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def tiny_unet(kind: str = "sd"):
    """SD1-like (conv projections), SD2-like (linear projections) or SDXL-like (text_time) tiny UNet."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                  cross_attention_dim=16)
    if kind == "sd2":
        kwargs["use_linear_projection"] = True
    if kind == "sdxl":
        kwargs.update(use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
                      addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    return UNet2DConditionModel(**kwargs)


def tiny_sd3(kind: str = "sd3"):
    """SD3-like joint-attention transformer; ``sd35`` adds SD3.5's dual attention (block 0) and RMS q/k norms."""
    from diffusers import SD3Transformer2DModel

    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if kind == "sd35" else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=40,
                                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8, **extra)


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=24,
                                    caption_channels=16, norm_num_groups=4, use_additional_conditions=True)


def make_gemma_tokenizer(folder: Path, max_length: int = 2048) -> None:
    """A tiny ``GemmaTokenizerFast`` (BPE over single characters plus a few merges, Gemma's special tokens
    ``<pad> <eos> <bos> <unk> <mask>``, a ``<bos>`` in front), saved with save_pretrained."""
    import string

    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in "\u2581\n" + string.ascii_letters + string.digits + ".,:;'-<>()!?\"":
        vocab[char] = len(vocab)
    merges = [("\u2581", "a"), ("c", "a"), ("ca", "t"), ("\u2581", "cat"), ("t", "h"), ("th", "e"), ("\u2581", "the")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    GemmaTokenizerFast(vocab=vocab, merges=merges, model_max_length=max_length, add_bos_token=True,
                       add_eos_token=False).save_pretrained(folder)


def tiny_sana():
    """A one-block ``SanaTransformer2DModel`` on 4×8×8 latents, 16-wide Gemma states."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=16, sample_size=8, patch_size=1)


def _sana_components(folder: Path, index: dict) -> None:
    """The SANA pipeline's transformer, Gemma2 text encoder and tokenizer, ``AutoencoderDC`` (×4: 32-pixel images,
    the pipeline's least) and scheduler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler
    from transformers import Gemma2Config, Gemma2Model

    index["_class_name"] = "SanaPipeline"
    tiny_sana().save_pretrained(folder / "transformer")
    AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                  encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8,) * 3,
                  decoder_block_out_channels=(8,) * 3, encoder_layers_per_block=(1,) * 3,
                  decoder_layers_per_block=(1,) * 3, encoder_qkv_multiscales=((), (), (5,)),
                  decoder_qkv_multiscales=((), (), (5,)),
                  scaling_factor=0.41407).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    Gemma2Model(Gemma2Config(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                             pad_token_id=0, eos_token_id=1, bos_token_id=2)).save_pretrained(folder / "text_encoder")
    make_gemma_tokenizer(folder / "tokenizer")
    index.update(transformer=["diffusers", "SanaTransformer2DModel"], vae=["diffusers", "AutoencoderDC"],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 text_encoder=["transformers", "Gemma2Model"], tokenizer=["transformers", "GemmaTokenizerFast"])


def tiny_flux(guidance_embeds: bool = True):
    """A Flux.1-like transformer (one double-stream and one single-stream block) on 4-channel latents packed 2×2
    into 16-channel tokens; ``guidance_embeds`` as FLUX.1-dev (True) or schnell (False)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))


# the keys of the original SD1.5 unet/config.json and scheduler/scheduler_config.json (diffusers 0.6 era)
SD15_UNET_KEYS = ("_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
                  "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding",
                  "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor",
                  "norm_eps", "norm_num_groups", "out_channels", "sample_size", "up_block_types")
SD15_SCHEDULER_KEYS = ("_class_name", "_diffusers_version", "beta_end", "beta_schedule", "beta_start",
                       "clip_sample", "num_train_timesteps", "set_alpha_to_one", "skip_prk_steps", "steps_offset",
                       "trained_betas", "prediction_type")


def _keep_only(config_path: Path, keys: tuple[str, ...]) -> None:
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k in keys}, indent=1))


def make_pipeline(folder: Path, kind: str = "sd", seed: int = 0, *, legacy_config: bool = False,
                  variant: str | None = None, hub_snapshot: bool = False) -> Path:
    """Write a tiny pipeline folder: kind in sd (ε), sd2 (v-prediction), sdxl, pixart, sd3, sd35 (flow), sana, flux
    (FLUX.1-dev-like: a guidance embedding, dynamic shift) or flux-schnell (no guidance embedding, no shift); see
    the module docstring for ``legacy_config`` (SD-like kinds), ``variant`` and ``hub_snapshot``."""
    if hub_snapshot:
        return _to_hub_snapshot(make_pipeline(Path(folder) / "plain", kind, seed, legacy_config=legacy_config,
                                              variant=variant), Path(folder) / f"models--tiny--{kind}")
    folder = _make_pipeline(folder, kind, seed)
    if legacy_config:
        if kind not in ("sd", "sd2"):
            raise ValueError("legacy_config is the SD1.5 config; use kind sd or sd2")
        _keep_only(folder / "unet" / "config.json", SD15_UNET_KEYS + (("use_linear_projection",) if kind == "sd2" else ()))
        _keep_only(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER_KEYS)
    if variant is not None:
        _to_variant(folder, variant)
    return folder


def _to_hub_snapshot(plain: Path, repo: Path) -> Path:
    """Move the files of ``plain`` into ``repo/blobs/<sha256>`` and link them from ``repo/snapshots/<commit>/``."""
    import hashlib
    import os

    snapshot = repo / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in plain.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            path.replace(blob)
        link = snapshot / path.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def _to_variant(folder: Path, variant: str) -> None:
    """Rewrite every weight file of ``folder`` as ``NAME.VARIANT.safetensors`` in fp16 (bf16 for the variant
    ``bf16``), the plain files removed."""
    from safetensors.torch import load_file, save_file

    dtype = torch.bfloat16 if variant == "bf16" else torch.float16
    for path in sorted(folder.glob("*/*.safetensors")):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path.with_name(f"{path.stem}.{variant}.safetensors")), metadata={"format": "pt"})
        path.unlink()


def _make_pipeline(folder: Path, kind: str, seed: int) -> Path:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict = {"_diffusers_version": "0.30.0"}
    if kind == "sana":
        _sana_components(folder, index)
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
        return folder
    if kind in ("flux", "flux-schnell"):
        return _make_flux(folder, index, kind)
    vae = _vae()
    if kind in ("sd3", "sd35"):  # SD3's VAE factors (its latents are shifted, then scaled)
        vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    vae.save_pretrained(folder / "vae")
    index["vae"] = ["diffusers", "AutoencoderKL"]
    if kind in ("sd3", "sd35"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    else:
        _scheduler("v_prediction" if kind == "sd2" else "epsilon").save_pretrained(folder / "scheduler")
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
    if kind in ("sd", "sd2"):
        index["_class_name"] = "StableDiffusionPipeline"
        tiny_unet(kind).save_pretrained(folder / "unet")
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        _clip(False).save_pretrained(folder / "text_encoder")
        make_tokenizer(folder / "tokenizer")
        index.update(text_encoder=["transformers", "CLIPTextModel"],
                     tokenizer=["transformers", "PreTrainedTokenizerFast"],
                     safety_checker=[None, None], feature_extractor=[None, None])
    elif kind == "sdxl":
        index["_class_name"] = "StableDiffusionXLPipeline"
        index["force_zeros_for_empty_prompt"] = True
        tiny_unet("sdxl").save_pretrained(folder / "unet")
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        _clip(False).save_pretrained(folder / "text_encoder")
        _clip(True).save_pretrained(folder / "text_encoder_2")
        make_tokenizer(folder / "tokenizer")
        make_tokenizer(folder / "tokenizer_2")
        index.update(text_encoder=["transformers", "CLIPTextModel"],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer=["transformers", "PreTrainedTokenizerFast"],
                     tokenizer_2=["transformers", "PreTrainedTokenizerFast"])
    elif kind == "pixart":
        index["_class_name"] = "PixArtAlphaPipeline"
        tiny_pixart().save_pretrained(folder / "transformer")
        index["transformer"] = ["diffusers", "PixArtTransformer2DModel"]
        T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)).save_pretrained(folder / "text_encoder")
        make_tokenizer(folder / "tokenizer", max_length=12)
        index.update(text_encoder=["transformers", "T5EncoderModel"],
                     tokenizer=["transformers", "PreTrainedTokenizerFast"])
    elif kind in ("sd3", "sd35"):
        index["_class_name"] = "StableDiffusion3Pipeline"
        tiny_sd3(kind).save_pretrained(folder / "transformer")
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
        for n in ("", "_2"):
            _clip(True).save_pretrained(folder / f"text_encoder{n}")
            make_tokenizer(folder / f"tokenizer{n}")
            index.update({f"text_encoder{n}": ["transformers", "CLIPTextModelWithProjection"],
                          f"tokenizer{n}": ["transformers", "PreTrainedTokenizerFast"]})
        T5EncoderModel(T5Config(vocab_size=64, d_model=40, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)).save_pretrained(folder / "text_encoder_3")
        make_tokenizer(folder / "tokenizer_3", max_length=12)
        index.update(text_encoder_3=["transformers", "T5EncoderModel"],
                     tokenizer_3=["transformers", "PreTrainedTokenizerFast"],
                     image_encoder=[None, None], feature_extractor=[None, None])
    else:
        raise ValueError(kind)
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def _make_flux(folder: Path, index: dict, kind: str) -> Path:
    """FluxPipeline's layout: CLIP (pooled) + T5, a 16-channel-token transformer, a VAE with a shift factor and
    the release's flow-matching scheduler (dev: dynamic shift; schnell: none)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    dev = kind == "flux"
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5,
                                    max_shift=1.15, base_image_seq_len=256,
                                    max_image_seq_len=4096).save_pretrained(folder / "scheduler")
    tiny_flux(guidance_embeds=dev).save_pretrained(folder / "transformer")
    _clip(False).save_pretrained(folder / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                            decoder_start_token_id=0)).save_pretrained(folder / "text_encoder_2")
    make_tokenizer(folder / "tokenizer")
    make_tokenizer(folder / "tokenizer_2", max_length=12)
    index.update(_class_name="FluxPipeline", vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 transformer=["diffusers", "FluxTransformer2DModel"],
                 text_encoder=["transformers", "CLIPTextModel"], text_encoder_2=["transformers", "T5EncoderModel"],
                 tokenizer=["transformers", "PreTrainedTokenizerFast"],
                 tokenizer_2=["transformers", "PreTrainedTokenizerFast"],
                 image_encoder=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def random_lorad_adapter(unet, folder, seed=1):
    """A LoRaD adapter folder on ``unet`` (preset rank 2) with clearly non-zero random angles, seeded."""
    from wadi_distill.lorad.model import inject_lorad, lorad_layers
    from wadi_distill.lorad.serialization import save_adapter
    from wadi_distill.plan import plan_from_preset

    torch.manual_seed(seed)
    adapted = type(unet).from_config(unet.config)
    adapted.load_state_dict(unet.state_dict())
    plan = plan_from_preset(adapted, 2)
    inject_lorad(adapted, plan, adapter_name="student", init="random", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in lorad_layers(adapted).values():
            layer.lorad_A["student"].normal_(0, 0.3)
    save_adapter(adapted, folder, plan, adapter_name="student")
    return folder


def reshard(component: Path, variant: str = "bf16", dtype: torch.dtype = torch.bfloat16,
            max_shard_size: str = "20KB") -> Path:
    """Rewrite a diffusers model folder as ``variant`` shards in ``dtype`` (diffusers' own naming,
    ``NAME.VARIANT-0000k-of-n.safetensors`` plus ``NAME.safetensors.index.VARIANT.json``), the old files removed."""
    import diffusers
    from diffusers.models.model_loading_utils import load_state_dict

    config = json.loads((component / "config.json").read_text())
    files = sorted(component.glob("*.safetensors"))
    model = getattr(diffusers, config["_class_name"]).from_config(config)
    state: dict = {}
    for path in files:
        state.update(load_state_dict(str(path)))
    model.load_state_dict(state)
    for path in files + sorted(component.glob("*.index*.json")):
        path.unlink()
    model.to(dtype).save_pretrained(component, variant=variant, max_shard_size=max_shard_size)
    return component
