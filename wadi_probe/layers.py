"""Names for where a tensor sits in a diffusion model: its module, block, layer type and kind.

Reports, plots and rank plans all group layers the same way, so the rules live here once. Names are the
normalised diffusers names (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``).
"""

from __future__ import annotations

import re
from typing import Sequence

_PARAM_SUFFIXES = ("weight", "bias")

_BLOCK_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|\.)down_blocks\.(\d+)\."), "down.{}"),
    (re.compile(r"(?:^|\.)up_blocks\.(\d+)\."), "up.{}"),
    (re.compile(r"(?:^|\.)mid_block\."), "mid"),
    (re.compile(r"(?:^|\.)transformer_blocks\.(\d+)\."), "transformer.{}"),
    (re.compile(r"(?:^|\.)single_transformer_blocks\.(\d+)\."), "single.{}"),
    # Z-Image: its main blocks (``layers.N``) and the refiners of each stream that come before them
    (re.compile(r"^layers\.(\d+)\."), "transformer.{}"),
    (re.compile(r"^noise_refiner\.(\d+)\."), "noise_refiner.{}"),
    (re.compile(r"^context_refiner\.(\d+)\."), "context_refiner.{}"),
)

_EMBEDDING_ROOTS = (
    "time_embedding",
    "add_embedding",
    "class_embedding",
    "time_proj",
    "pos_embed",
    "patch_embed",
    "adaln_single",
    "caption_projection",
    "time_text_embed",
    "context_embedder",
    "x_embedder",
    "encoder_hid_proj",
)

# transformers' input projections: ``nn.Linear`` layers although their names say "embed"
_LINEAR_EMBEDDERS = ("x_embedder", "context_embedder")
_FEED_FORWARD = re.compile(r"(?:^|\.)(?:ff|ff_context|feed_forward|mlp|img_mlp|txt_mlp)(?:\.|$)")
# the text (context) stream of joint-attention transformers (SD3, Flux double blocks, Qwen-Image): its own
# feed-forward, its own q/k/v/out projections inside the shared attention, its own modulation
_TEXT_FEED_FORWARD = re.compile(r"(?:^|\.)(?:ff_context|txt_mlp)(?:\.|$)")
_TEXT_ATTENTION = re.compile(r"(?:^|\.)attn\d*\.(?:add_[qkv]_proj|to_add_out|norm_added_[qk])$")
# adaLN modulation: the Linear that turns the conditioning into shift/scale/gate (norm1.linear, img_mod.1, ...)
_MODULATION = re.compile(r"(?:^|\.)(?:norm\w*\.linear|img_mod(?:\.\d+)?|txt_mod(?:\.\d+)?|adaLN_modulation(?:\.\d+)?)$")
_TEXT_MODULATION = re.compile(r"(?:^|\.)(?:norm1_context\.linear|txt_mod(?:\.\d+)?)$")
_ATTENTION = re.compile(r"(?:^|\.)(?:attentions\.\d+|attn\d*|attention|self_attn|cross_attn)(?:\.|$)")
_NORM_MODULE = re.compile(r"(?:^|\.)(?:[a-z_]*norm[a-z_0-9]*|ln_?\w*)$")


def module_of(name: str) -> str:
    """The module path of a parameter name: ``"x.to_q.weight"`` -> ``"x.to_q"``.

    Names that do not end in ``.weight``/``.bias`` (e.g. ``scale_shift_table``) are their own module.
    """
    head, _, last = name.rpartition(".")
    if head and last in _PARAM_SUFFIXES:
        return head
    return name


def block_of(name: str) -> str:
    """The block a tensor belongs to: ``"down.0"``, ``"mid"``, ``"up.2"``, ``"transformer.5"``, ``"embedding"``, ``"other"``."""
    for pattern, label in _BLOCK_PATTERNS:
        match = pattern.search(name)
        if match:
            return label.format(*match.groups())
    root = name.split(".", 1)[0]
    if root in _EMBEDDING_ROOTS or "embed" in root:
        return "embedding"
    return "other"


def kind_of(name: str, shape: Sequence[int]) -> str:
    """What kind of weight this is: ``linear``, ``conv``, ``conv1x1``, ``embedding``, ``norm``, ``bias`` or ``other``.

    Convolution kernels with every spatial size 1 are ``conv1x1`` (mathematically a linear layer); a 2-D
    ``.weight`` whose module name says ``embed`` is an ``nn.Embedding`` table, except the transformers' input
    projections ``x_embedder`` and ``context_embedder`` (Linear layers in Flux, SD3, Qwen-Image).
    """
    ndim = len(shape)
    last = name.rpartition(".")[2]
    module = module_of(name)
    leaf = module.rpartition(".")[2]
    if last == "bias":
        return "bias"
    if ndim == 1:
        return "norm" if _NORM_MODULE.search(module) else "other"
    if ndim == 2:
        if last != "weight":
            return "other"
        return "embedding" if "embed" in leaf.lower() and leaf not in _LINEAR_EMBEDDERS else "linear"
    if ndim >= 3 and last == "weight":
        return "conv1x1" if all(int(k) == 1 for k in shape[2:]) else "conv"
    return "other"


def layer_type_of(name: str, shape: Sequence[int]) -> str:
    """The role of the layer: ``"attention"``, ``"feed-forward"``, ``"resnet conv"``, ``"modulation"`` or ``"other"``.

    Feed-forward is checked first (a UNet's feed-forward sits inside ``attentions.N``); everything else in an
    attention block (q/k/v/out, proj_in/proj_out, its norms) is ``attention``; the convolutions of resnet
    blocks are ``resnet conv``; the rest (time projections, up/down samplers, conv_in/out) is ``other``.

    Joint-attention transformers keep their two streams apart: the text stream's layers (``add_q_proj`` …
    ``to_add_out``, ``ff_context`` / ``txt_mlp``, ``norm1_context.linear`` / ``txt_mod``) get `` (text)`` after
    their type, the image stream's (``to_q`` …, ``ff`` / ``img_mlp``) the plain type. adaLN modulation Linears
    are ``modulation``; in a Flux single block ``proj_mlp`` is the feed-forward input and ``proj_out``, which
    projects attention and MLP output together, is ``attention + feed-forward``.
    """
    module = module_of(name)
    if _TEXT_FEED_FORWARD.search(module):
        return "feed-forward (text)"
    if _FEED_FORWARD.search(module):
        return "feed-forward"
    if _TEXT_ATTENTION.search(module):
        return "attention (text)"
    if _TEXT_MODULATION.search(module):
        return "modulation (text)"
    if _MODULATION.search(module):
        return "modulation"
    if re.search(r"(?:^|\.)single_transformer_blocks\.\d+\.proj_mlp$", module):
        return "feed-forward"
    if re.search(r"(?:^|\.)single_transformer_blocks\.\d+\.proj_out$", module):
        return "attention + feed-forward"
    if _ATTENTION.search(module):
        return "attention"
    if re.search(r"(?:^|\.)resnets\.\d+\.", module) and kind_of(name, shape) in ("conv", "conv1x1"):
        return "resnet conv"
    return "other"
