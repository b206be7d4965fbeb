"""Original LDM/CompVis UNet key names <-> diffusers ``UNet2DConditionModel`` names, computed from the keys alone.

An LDM single file stores the UNet under ``model.diffusion_model.`` as ``input_blocks.i.k``, ``middle_block.k``
and ``output_blocks.i.k``. The diffusers block structure (how many resnets/attentions each down and up block
has, where the down/upsamplers sit) is read off those keys locally — nothing is fetched — and the result is a
plain name map, so tensors are still read one at a time. Inside a transformer block LDM and diffusers already
agree (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj`` ...); only resnet parts and the
top-level modules are renamed. Both conv (SD1) and linear (SD2/SDXL) ``proj_in``/``proj_out`` keep their shapes.
"""

from __future__ import annotations

import re
from collections import defaultdict
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

_BLOCK_ENTRY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_ENTRY = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def _rename_prefix(name: str, renames: Mapping[str, str]) -> str | None:
    """Apply the longest matching dotted-prefix rename, or return None."""
    for old in sorted(renames, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return None


def _part_kind(rests: list[str], where: str) -> str:
    """Classify an LDM sub-module by its parameter names: resnet, attention, downsampler or upsampler."""
    heads = {rest.split(".")[0] for rest in rests}
    if "in_layers" in heads or "out_layers" in heads:
        return "resnet"
    if "transformer_blocks" in heads or "proj_in" in heads:
        return "attention"
    if heads == {"op"}:
        return "downsampler"
    if heads == {"conv"}:
        return "upsampler"
    raise WadiInputError(f"the LDM UNet part {where} has parameters ({', '.join(sorted(heads))}) this tool does not recognise.")


def _group(names: Iterable[str]) -> tuple[dict, dict, list[str]]:
    """Split LDM names into {(section, i, k): [rest]}, {k: [rest]} for the middle block, and everything else."""
    blocks: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    middle: dict[int, list[str]] = defaultdict(list)
    other: list[str] = []
    for name in names:
        match = _BLOCK_ENTRY.match(name)
        if match and not (match.group(1) == "input_blocks" and match.group(2) == "0"):
            blocks[(match.group(1), int(match.group(2)), int(match.group(3)))].append(match.group(4))
            continue
        match = _MIDDLE_ENTRY.match(name)
        if match:
            middle[int(match.group(1))].append(match.group(2))
            continue
        other.append(name)
    return blocks, middle, other


def ldm_to_diffusers_names(ldm_shapes: Mapping[str, Any] | Iterable[str]) -> dict[str, str]:
    """Map LDM UNet names (without ``model.diffusion_model.``) to diffusers ``UNet2DConditionModel`` names.

    Only the key names are needed (shapes may be passed but are not used). Names this mapping does not know
    keep their LDM spelling, so they show up as unmatched instead of silently disappearing.
    """
    names = list(ldm_shapes)
    blocks, middle, other = _group(names)
    mapping: dict[str, str] = {}

    # down path: input_blocks 1.. in order; a downsampler closes a down block
    input_ids = sorted({i for (section, i, _) in blocks if section == "input_blocks"})
    down, layer = 0, 0
    layers_per_down: list[int] = []
    for i in input_ids:
        parts = sorted(k for (section, j, k) in blocks if section == "input_blocks" and j == i)
        kinds = {k: _part_kind(blocks[("input_blocks", i, k)], f"input_blocks.{i}.{k}") for k in parts}
        if "downsampler" in kinds.values():
            for k in parts:
                for rest in blocks[("input_blocks", i, k)]:
                    mapping[f"input_blocks.{i}.{k}.{rest}"] = f"down_blocks.{down}.downsamplers.0.conv.{rest[len('op.'):]}"
            layers_per_down.append(layer)
            down, layer = down + 1, 0
            continue
        for k in parts:
            target = _sub_module(kinds[k], f"down_blocks.{down}", layer)
            for rest in blocks[("input_blocks", i, k)]:
                mapping[f"input_blocks.{i}.{k}.{rest}"] = target + "." + _inner(kinds[k], rest)
        layer += 1
    layers_per_down.append(layer)

    # up path: up block b mirrors down block (n-1-b) and has one more layer; an upsampler sits in its last entry
    output_ids = sorted({i for (section, i, _) in blocks if section == "output_blocks"})
    layers_per_up = [n + 1 for n in reversed(layers_per_down)]
    if output_ids and sum(layers_per_up) != len(output_ids):
        raise WadiInputError(
            f"this LDM UNet has {len(output_ids)} output blocks but its input blocks imply {sum(layers_per_up)}; "
            "the layout is not one this tool recognises."
        )
    position = 0
    for up, count in enumerate(layers_per_up if output_ids else []):
        for layer in range(count):
            i = output_ids[position]
            position += 1
            for k in sorted(k for (section, j, k) in blocks if section == "output_blocks" and j == i):
                rests = blocks[("output_blocks", i, k)]
                kind = _part_kind(rests, f"output_blocks.{i}.{k}")
                for rest in rests:
                    if kind == "upsampler":
                        mapping[f"output_blocks.{i}.{k}.{rest}"] = f"up_blocks.{up}.upsamplers.0.{rest}"
                    else:
                        mapping[f"output_blocks.{i}.{k}.{rest}"] = _sub_module(kind, f"up_blocks.{up}", layer) + "." + _inner(kind, rest)

    # middle block: resnet, attention, resnet (or resnets only)
    counters = {"resnet": 0, "attention": 0}
    for k in sorted(middle):
        kind = _part_kind(middle[k], f"middle_block.{k}")
        if kind not in counters:
            raise WadiInputError(f"the LDM middle block part {k} is a {kind}, which this tool does not expect there.")
        target = _sub_module(kind, "mid_block", counters[kind])
        counters[kind] += 1
        for rest in middle[k]:
            mapping[f"middle_block.{k}.{rest}"] = target + "." + _inner(kind, rest)

    for name in other:
        mapping[name] = _rename_prefix(name, TOP_LEVEL_RENAMES) or name
    return mapping


def _sub_module(kind: str, block: str, layer: int) -> str:
    return f"{block}.resnets.{layer}" if kind == "resnet" else f"{block}.attentions.{layer}"


def _inner(kind: str, rest: str) -> str:
    if kind == "resnet":
        renamed = _rename_prefix(rest, RESNET_RENAMES)
        if renamed is None:
            raise WadiInputError(f"the LDM resnet parameter {rest!r} is not one this tool recognises.")
        return renamed
    return rest


_DIFFUSERS_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def diffusers_to_ldm_names(names: Iterable[str]) -> dict[str, str]:
    """Map diffusers ``UNet2DConditionModel`` names to LDM names (without ``model.diffusion_model.``).

    The inverse of :func:`ldm_to_diffusers_names`; used to write LDM-layout files (and test fixtures).
    """
    names = list(names)
    layers: dict[tuple[str, int], int] = defaultdict(int)  # resnets per block
    has_attention: set[tuple[str, int]] = set()
    has_sampler: set[tuple[str, int]] = set()
    mid_attention = False
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
        elif name.startswith("mid_block.attentions."):
            mid_attention = True
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

    mapping: dict[str, str] = {}
    for name in names:
        match = _DIFFUSERS_PART.match(name)
        if match:
            section, b, part, layer, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
            if section == "down_blocks":
                if part == "downsamplers":
                    mapping[name] = f"input_blocks.{down_start[b] + layers[(section, b)]}.0.op.{rest[len('conv.'):]}"
                else:
                    i = down_start[b] + layer
                    mapping[name] = f"input_blocks.{i}." + _ldm_part(part, rest)
            else:
                i = up_start[b] + (layers[(section, b)] - 1 if part == "upsamplers" else layer)
                if part == "upsamplers":
                    k = 2 if (section, b) in has_attention else 1
                    mapping[name] = f"output_blocks.{i}.{k}.{rest}"
                else:
                    mapping[name] = f"output_blocks.{i}." + _ldm_part(part, rest)
            continue
        match = _DIFFUSERS_MID.match(name)
        if match:
            part, index_in_mid, rest = match.group(1), int(match.group(2)), match.group(3)
            if part == "attentions":
                k = 1
            else:
                k = 0 if index_in_mid == 0 else (2 if mid_attention else 1)
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
