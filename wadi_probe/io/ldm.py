"""Original LDM/CompVis UNet key names <-> diffusers ``UNet2DConditionModel`` names, computed from the keys alone.

An LDM single file stores the UNet under ``model.diffusion_model.`` as ``input_blocks.i.k``, ``middle_block.k``
and ``output_blocks.i.k``. Reading (LDM → diffusers) is diffusers' own converter run on the names: the few
config entries it needs are read off the keys locally (nothing is fetched) and the result is a plain name map,
so tensors are still read one at a time. Writing (diffusers → LDM, :func:`diffusers_to_ldm_names`) has no
diffusers counterpart for the UNet, so it is written here, and the tests hold it to be the exact inverse of
diffusers' converter. Inside a transformer block LDM and diffusers already agree (``proj_in``,
``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj`` ...); only resnet parts and the top-level modules are
renamed. Both conv (SD1) and linear (SD2/SDXL) ``proj_in``/``proj_out`` keep their shapes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Iterable, Mapping
from typing import Any

from wadi_probe.errors import WadiInputError

# ResBlock parts: LDM -> diffusers ResnetBlock2D
RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# top-level modules: LDM -> diffusers (``label_emb.0.*`` is SDXL's added time/text embedding)
TOP_LEVEL_RENAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_INVERSE_RESNET = {v: k for k, v in RESNET_RENAMES.items()}
_INVERSE_TOP = {v: k for k, v in TOP_LEVEL_RENAMES.items()}
_INVERSE_TOP["class_embedding.linear_1"] = "label_emb.0.0"
_INVERSE_TOP["class_embedding.linear_2"] = "label_emb.0.2"



def _rename_prefix(name: str, renames: Mapping[str, str]) -> str | None:
    """Apply the longest matching dotted-prefix rename, or return None."""
    for old in sorted(renames, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return None


def _converter_config(names: list[str]) -> dict[str, Any]:
    """The few config entries diffusers' LDM converter reads, recovered from the LDM key names alone.

    The converter assumes the same number of layers in every down block (as every SD/SDXL UNet has); a file
    that breaks that, or whose output blocks do not mirror its input blocks, is refused here by name.
    """
    inputs = sorted({int(m.group(1)) for n in names if (m := re.match(r"^input_blocks\.(\d+)\.", n))})
    outputs = {int(m.group(1)) for n in names if (m := re.match(r"^output_blocks\.(\d+)\.", n))}
    samplers = sorted({int(m.group(1)) for n in names if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.", n))})
    layers = samplers[0] - 1 if samplers else max(inputs, default=1)
    if layers < 1 or samplers != [(k + 1) * (layers + 1) for k in range(len(samplers))]:
        raise WadiInputError("this LDM UNet's down blocks do not all have the same number of layers; "
                             "the layout is not one this tool recognises.")
    expected = (len(samplers) + 1) * (layers + 1)
    if outputs and len(outputs) != expected:
        raise WadiInputError(
            f"this LDM UNet has {len(outputs)} output blocks but its input blocks imply {expected}; "
            "the layout is not one this tool recognises."
        )
    config: dict[str, Any] = {"layers_per_block": layers}
    if any(n.startswith("label_emb.0.0.") for n in names):
        config["addition_embed_type"] = "text_time"  # SDXL's added time/text embedding
    if "label_emb.weight" in names:
        config["num_class_embeds"] = 1
    return config


def ldm_to_diffusers_names(ldm_shapes: Mapping[str, Any] | Iterable[str]) -> dict[str, str]:
    """Map LDM UNet names (without ``model.diffusion_model.``) to diffusers ``UNet2DConditionModel`` names.

    Uses diffusers' own single-file converter (``convert_ldm_unet_checkpoint``), fed the names themselves as
    placeholder values, so it moves names instead of tensors and the checkpoint stays lazy. Only the key names
    are needed (shapes may be passed but are not used). Names the converter does not place keep their LDM
    spelling, so they show up as unmatched instead of silently disappearing.
    """
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    names = list(ldm_shapes)
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + n: n for n in names}, _converter_config(names))
    mapping = {ldm: diffusers for diffusers, ldm in converted.items() if isinstance(ldm, str)}
    for name in names:
        target = mapping.setdefault(name, name)
        if ".attentions." in target and re.search(r"\.(in_layers|out_layers|emb_layers)\.", target):
            raise WadiInputError(f"the LDM UNet part {name} is a resnet where diffusers expects an attention; "
                                 "the layout is not one this tool recognises.")
    return mapping


_DIFFUSERS_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


@dataclass
class _BlockLayout:
    """How a diffusers UNet's blocks sit in LDM's flat ``input_blocks`` / ``output_blocks`` numbering."""

    layers: dict[tuple[str, int], int]  # resnets per (down_blocks|up_blocks, b)
    has_attention: set[tuple[str, int]]
    mid_attention: bool
    down_start: dict[int, int]  # the input block holding down block b's first layer
    up_start: dict[int, int]  # the output block holding up block b's first layer


def _block_layout(names: list[str]) -> _BlockLayout:
    layers: dict[tuple[str, int], int] = defaultdict(int)
    has_attention: set[tuple[str, int]] = set()
    has_sampler: set[tuple[str, int]] = set()
    for name in names:
        match = _DIFFUSERS_PART.match(name)
        if match:
            block = (match.group(1), int(match.group(2)))
            if match.group(3) == "resnets":
                layers[block] = max(layers[block], int(match.group(4)) + 1)
            elif match.group(3) == "attentions":
                has_attention.add(block)
            else:
                has_sampler.add(block)
    n_down = 1 + max((b for (kind, b) in layers if kind == "down_blocks"), default=-1)
    n_up = 1 + max((b for (kind, b) in layers if kind == "up_blocks"), default=-1)
    down_start, index = {}, 1
    for b in range(n_down):
        down_start[b] = index
        index += layers[("down_blocks", b)] + (1 if ("down_blocks", b) in has_sampler else 0)
    up_start, index = {}, 0
    for b in range(n_up):
        up_start[b] = index
        index += layers[("up_blocks", b)]
    mid_attention = any(name.startswith("mid_block.attentions.") for name in names)
    return _BlockLayout(dict(layers), has_attention, mid_attention, down_start, up_start)


def _ldm_block_name(layout: _BlockLayout, section: str, b: int, part: str, layer: int, rest: str) -> str:
    """The LDM name of one parameter of down/up block ``b`` (``part``: resnets, attentions or a sampler)."""
    if section == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{layout.down_start[b] + layout.layers[(section, b)]}.0.op.{rest[len('conv.'):]}"
        return f"input_blocks.{layout.down_start[b] + layer}." + _ldm_part(part, rest)
    if part == "upsamplers":
        k = 2 if (section, b) in layout.has_attention else 1
        return f"output_blocks.{layout.up_start[b] + layout.layers[(section, b)] - 1}.{k}.{rest}"
    return f"output_blocks.{layout.up_start[b] + layer}." + _ldm_part(part, rest)


def diffusers_to_ldm_names(names: Iterable[str]) -> dict[str, str]:
    """Map diffusers ``UNet2DConditionModel`` names to LDM names (without ``model.diffusion_model.``).

    The inverse of :func:`ldm_to_diffusers_names`; used to write LDM-layout files (and test fixtures).
    """
    names = list(names)
    layout = _block_layout(names)
    mapping: dict[str, str] = {}
    for name in names:
        match = _DIFFUSERS_PART.match(name)
        if match:
            section, b, part, layer, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
            mapping[name] = _ldm_block_name(layout, section, b, part, layer, rest)
            continue
        match = _DIFFUSERS_MID.match(name)
        if match:
            part, index_in_mid, rest = match.group(1), int(match.group(2)), match.group(3)
            k = 1 if part == "attentions" else (0 if index_in_mid == 0 else (2 if layout.mid_attention else 1))
            mapping[name] = f"middle_block.{k}." + (_inverse_resnet(rest) if part == "resnets" else rest)
            continue
        mapping[name] = _rename_prefix(name, _INVERSE_TOP) or name
    return mapping


def _ldm_part(part: str, rest: str) -> str:
    return f"0.{_inverse_resnet(rest)}" if part == "resnets" else f"1.{rest}"


def _inverse_resnet(rest: str) -> str:
    renamed = _rename_prefix(rest, _INVERSE_RESNET)
    if renamed is None:
        raise WadiInputError(f"the diffusers resnet parameter {rest!r} has no LDM counterpart.")
    return renamed


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Derive a ``UNet2DConditionModel`` config from diffusers-named tensor shapes (no Hub, no config file).

    Recovers channels, block types, layers per block, transformer depth per block, cross-attention width and
    conv-vs-linear projections. Head counts and group-norm groups do not show in the weights; they are left at
    the SD defaults (``attention_head_dim=8``, ``norm_num_groups=32``) and can be overridden by the caller.
    """
    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        found = {int(m.group(1)) for name in shapes if (m := regex.match(name))}
        return max(found) + 1 if found else 0

    n_down = count(r"^down_blocks\.(\d+)\.")
    if n_down == 0 or "conv_in.weight" not in shapes:
        raise WadiInputError("these weights do not look like a UNet2DConditionModel (no conv_in or down_blocks).")
    channels, down_types, up_types, layers, depth = [], [], [], [], []
    for b in range(n_down):
        channels.append(shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0])
        layers.append(count(rf"^down_blocks\.{b}\.resnets\.(\d+)\."))
        attention = count(rf"^down_blocks\.{b}\.attentions\.(\d+)\.") > 0
        down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        depth.append(count(rf"^down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") or None)
    for b in range(count(r"^up_blocks\.(\d+)\.")):
        attention = count(rf"^up_blocks\.{b}\.attentions\.(\d+)\.") > 0
        up_types.append("CrossAttnUpBlock2D" if attention else "UpBlock2D")
    mid_attention = any(name.startswith("mid_block.attentions.") for name in shapes)
    # blocks without attention have no depth of their own; diffusers gives the mid block the last entry's depth
    mid_depth = count(r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.") or None
    fill = mid_depth or next((d for d in depth if d), 1)
    depth = [d or fill for d in depth]
    if mid_depth:
        depth[-1] = mid_depth
    cross = next((shape[1] for name, shape in shapes.items() if name.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for name, shape in shapes.items() if name.endswith(".proj_in.weight")), None)
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": shapes["conv_in.weight"][1],
        "out_channels": shapes["conv_out.weight"][0] if "conv_out.weight" in shapes else shapes["conv_in.weight"][1],
        "block_out_channels": tuple(channels),
        "down_block_types": tuple(down_types),
        "up_block_types": tuple(up_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attention else None,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else tuple(layers),
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else tuple(depth),
        "use_linear_projection": proj_in is not None and len(proj_in) == 2,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    if cross is not None:
        config["cross_attention_dim"] = cross
    if "add_embedding.linear_1.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    return config
