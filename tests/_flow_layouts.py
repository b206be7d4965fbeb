"""Tiny Flux.1 and SD3 transformers, and their weights written in the original single-file layouts.

The inverse maps here (diffusers names -> original keys) are written from the documented layouts (Black Forest
Labs' Flux reference code, Stability's SD3 reference code), independently of the reader in
``wadi_probe.io.flow`` (which runs diffusers' converters), so the tests check one against the other.
"""

from __future__ import annotations

import re

import torch

FLUX_TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))


def tiny_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**FLUX_TINY, **overrides})
    _randomise(model, seed)
    return model


def tiny_sd3(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**SD3_TINY, **overrides})
    _randomise(model, seed)
    return model


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm scales and zero-initialised biases included), so every tensor is distinct."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_FLUX_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                      "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def flux_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux state dict in Black Forest Labs' layout (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    singles = sorted({int(m.group(1)) for k in state if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for module, original in _FLUX_TOP.items():
        for p in ("weight", "bias"):
            if f"{module}.{p}" in state:
                out[f"{original}.{p}"] = state[f"{module}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(state[f"norm_out.linear.{p}"])
    for i in blocks:
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            for module, original in _FLUX_DOUBLE.items():
                out[f"{o}{original}.{p}"] = state[f"{d}{module}.{p}"]
            out[f"{o}img_attn.qkv.{p}"] = torch.cat([state[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}txt_attn.qkv.{p}"] = torch.cat([state[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
        for module, original in _FLUX_DOUBLE_NORMS.items():
            out[f"{o}{original}.scale"] = state[f"{d}{module}.weight"]
    for i in singles:
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}modulation.lin.{p}"] = state[f"{d}norm.linear.{p}"]
            out[f"{o}linear1.{p}"] = torch.cat([state[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [state[f"{d}proj_mlp.{p}"]])
            out[f"{o}linear2.{p}"] = state[f"{d}proj_out.{p}"]
        out[f"{o}norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
    return out


_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}


def sd3_original(state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """A diffusers SD3 state dict in Stability's layout (``joint_blocks.N.{x,context}_block``)."""
    out: dict[str, torch.Tensor] = {"pos_embed": state["pos_embed.pos_embed"]}
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for module, original in _SD3_TOP.items():
        for p in ("weight", "bias"):
            out[f"{original}.{p}"] = state[f"{module}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(state[f"norm_out.linear.{p}"])
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == blocks[-1]
        for p in ("weight", "bias"):
            out[f"{x}attn.qkv.{p}"] = torch.cat([state[f"{d}attn.to_{q}.{p}"] for q in "qkv"])
            out[f"{c}attn.qkv.{p}"] = torch.cat([state[f"{d}attn.add_{q}_proj.{p}"] for q in "qkv"])
            out[f"{x}attn.proj.{p}"] = state[f"{d}attn.to_out.0.{p}"]
            out[f"{x}adaLN_modulation.1.{p}"] = state[f"{d}norm1.linear.{p}"]
            context_mod = state[f"{d}norm1_context.linear.{p}"]
            out[f"{c}adaLN_modulation.1.{p}"] = _swap_halves(context_mod) if last else context_mod
            out[f"{x}mlp.fc1.{p}"] = state[f"{d}ff.net.0.proj.{p}"]
            out[f"{x}mlp.fc2.{p}"] = state[f"{d}ff.net.2.{p}"]
            if not last:
                out[f"{c}attn.proj.{p}"] = state[f"{d}attn.to_add_out.{p}"]
                out[f"{c}mlp.fc1.{p}"] = state[f"{d}ff_context.net.0.proj.{p}"]
                out[f"{c}mlp.fc2.{p}"] = state[f"{d}ff_context.net.2.{p}"]
            if f"{d}attn2.to_q.{p}" in state:
                out[f"{x}attn2.qkv.{p}"] = torch.cat([state[f"{d}attn2.to_{q}.{p}"] for q in "qkv"])
                out[f"{x}attn2.proj.{p}"] = state[f"{d}attn2.to_out.0.{p}"]
        for ours, theirs, block in (("norm_q", "ln_q", x), ("norm_k", "ln_k", x), ("norm_added_q", "ln_q", c),
                                    ("norm_added_k", "ln_k", c)):
            if f"{d}attn.{ours}.weight" in state:
                out[f"{block}attn.{theirs}.weight"] = state[f"{d}attn.{ours}.weight"]
        for ours, theirs in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
            if f"{d}attn2.{ours}.weight" in state:
                out[f"{x}attn2.{theirs}.weight"] = state[f"{d}attn2.{ours}.weight"]
    return {prefix + k: v.contiguous() for k, v in out.items()}
