"""Original single files of the flow-matching transformers (Flux.1, SD3/SD3.5) under diffusers names, read lazily.

Black Forest Labs ship Flux.1 as one file in its own layout (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1`` …, no prefix); Stability ship SD3/SD3.5 as ``model.diffusion_model.joint_blocks.N.
{x,context}_block.*`` beside the VAE and text encoders; ComfyUI saves either with the ``model.diffusion_model.``
prefix. Several diffusers tensors live inside one stored tensor there: q, k and v are fused along the output rows
(``qkv``), a Flux single block fuses q, k, v and the MLP input (``linear1``), and the final modulation stores
(shift, scale) where diffusers has (scale, shift).

The map is diffusers' own converter (``convert_flux_transformer_checkpoint_to_diffusers``,
``convert_sd3_transformer_checkpoint_to_diffusers``) run on row-index tensors instead of weights: each stored key
gets a 1-D float64 tensor whose entries encode (key, row), so whatever the converter chunks, splits, swaps and
renames, each tensor it returns says which rows of which stored key make up that diffusers tensor. Nothing is read
to build the map, and a diffusers tensor is read later as just its rows (a positioned read per row range).

The Flux converter splits ``linear1`` at the released models' hard-coded width (3 × 3072 + 12288 rows); for other
widths its index tensor gets the converter's row count with each entry naming its part (q, k, v, MLP in), and the
parts are then placed at the file's own width, read off ``single_blocks.N.linear2`` (hidden, hidden + MLP width).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["FAMILIES", "Segment", "original_family", "original_to_diffusers", "SplitSource"]

#: the original layouts this module reads, by the key that tells them apart
FAMILIES = {"flux": "double_blocks.", "sd3": "joint_blocks."}
_LABEL = {"flux": "Flux", "sd3": "SD3"}
# the Flux converter's fixed split of single_blocks.N.linear1: q, k, v (3072 rows each), then the MLP input
_FLUX_CONVERTER_WIDTH = 3072
_FLUX_CONVERTER_PARTS = (_FLUX_CONVERTER_WIDTH,) * 3 + (4 * _FLUX_CONVERTER_WIDTH,)
_ROW_BITS = 2.0 ** 32  # an index entry is key_id · 2^32 + row (exact in float64 up to 2^21 keys)


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of the stored tensor ``key`` (dimension 0)."""

    key: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def original_family(names: list[str]) -> str | None:
    """``"flux"``, ``"sd3"`` or None, from names without ``model.diffusion_model.``."""
    for family, marker in FAMILIES.items():
        if any(name.startswith(marker) for name in names):
            return family
    return None


def _block_indices(names: list[str], section: str) -> list[int]:
    return sorted({int(m.group(1)) for name in names if (m := re.match(rf"^{section}\.(\d+)\.", name))})


def _check_blocks(names: list[str], family: str, where: str) -> None:
    """Refuse block numbering with gaps, or blocks lacking tensors their siblings have, in one sentence."""
    sections = ("double_blocks", "single_blocks") if family == "flux" else ("joint_blocks",)
    for section in sections:
        indices = _block_indices(names, section)
        if not indices:
            raise WadiInputError(f"{where} is a {_LABEL[family]} original file without any {section}.N tensor "
                                 "(an incomplete or partial file).")
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        if missing:
            shown = ", ".join(str(i) for i in missing[:8]) + (" …" if len(missing) > 8 else "")
            raise WadiInputError(
                f"{where} lacks {section} {shown} of 0–{indices[-1]} ({len(missing)} of {indices[-1] + 1} blocks "
                "missing): it is an incomplete or partial file."
            )
        parts = {i: {name.split(".", 2)[2] for name in names if name.startswith(f"{section}.{i}.")} for i in indices}
        # SD3's last joint block has a smaller context block (no attn.proj, no mlp): compare it with itself only
        full = parts[indices[0]]
        for i in indices[: -1] if family == "sd3" else indices:
            lacking = sorted(full - parts[i])
            if lacking:
                raise WadiInputError(
                    f"{where} lacks {section}.{i}.{lacking[0]} ({len(lacking)} of block {i}'s tensors missing): "
                    "it is an incomplete or partial file."
                )


def _flux_linear1_parts(shapes: Mapping[str, tuple[int, ...]], key: str, where: str) -> tuple[int, int, int, int]:
    """The row counts of q, k, v and the MLP input fused in a Flux ``single_blocks.N.linear1`` tensor."""
    block = key.split(".", 2)[1]
    linear2 = shapes.get(f"single_blocks.{block}.linear2.weight")
    rows = shapes[key][0]
    if linear2 is None or len(linear2) != 2:
        raise WadiInputError(f"{where} has single_blocks.{block}.linear1 without its linear2 weight, so the fused "
                             "q, k, v and MLP input cannot be told apart (an incomplete file).")
    hidden, mlp = linear2[0], linear2[1] - linear2[0]
    if mlp <= 0 or rows != 3 * hidden + mlp:
        raise WadiInputError(
            f"{where}: single_blocks.{block}.linear1 has {rows} rows, which do not split into q, k, v (3 × {hidden}) "
            f"and the MLP input ({mlp}) that single_blocks.{block}.linear2 {tuple(linear2)} implies."
        )
    return hidden, hidden, hidden, mlp


def _check_fused(shapes: Mapping[str, tuple[int, ...]], family: str, where: str) -> None:
    """Refuse a fused ``qkv`` tensor, or a modulation the converter halves, whose rows do not divide into its parts."""
    halved = r"^final_layer\.adaLN_modulation\.1\."
    if family == "sd3":
        last = _block_indices(list(shapes), "joint_blocks")[-1]
        halved += rf"|^joint_blocks\.{last}\.context_block\.adaLN_modulation\.1\."
    for key, shape in shapes.items():
        if not shape:
            continue
        if re.search(r"\.qkv\.(weight|bias)$", key) and shape[0] % 3:
            raise WadiInputError(f"{where}: the fused tensor {key} has {shape[0]} rows, which do not divide by 3 "
                                 "into equal q, k and v parts.")
        if re.search(halved, key) and shape[0] % 2:
            raise WadiInputError(f"{where}: the modulation tensor {key} has {shape[0]} rows, which do not divide "
                                 "into its shift and scale halves.")


def _converter(family: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    from diffusers.loaders import single_file_utils

    if family == "flux":
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    return single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers


def original_to_diffusers(shapes: Mapping[str, tuple[int, ...]], family: str, where: str = "the file"
                          ) -> dict[str, list[Segment]]:
    """Map a Flux/SD3 original file's keys (no ``model.diffusion_model.``) to diffusers names and row segments.

    Returns {diffusers name: the row segments of stored keys that, concatenated, make that tensor}. A key the
    converter leaves alone keeps its original spelling (one whole segment), so it shows up as unmatched instead of
    disappearing. Raises :class:`WadiInputError` for missing blocks or tensors and fused sizes that do not divide.
    """
    names = list(shapes)
    _check_blocks(names, family, where)
    _check_fused(shapes, family, where)
    keys = sorted(names)
    key_id = {key: i for i, key in enumerate(keys)}
    # virtual parts: Flux's linear1 handed to the converter at its fixed width, each entry naming its part
    virtual: dict[str, list[tuple[int, int]]] = {}
    probes: dict[str, torch.Tensor] = {}
    for key in keys:
        rows = shapes[key][0] if shapes[key] else 1
        base = key_id[key] * _ROW_BITS
        if family == "flux" and re.match(r"^single_blocks\.\d+\.linear1\.(weight|bias)$", key):
            parts = _flux_linear1_parts(shapes, key.replace(".bias", ".weight"), where)
            bounds = [0, *accumulate(parts)]
            if rows != bounds[-1]:
                raise WadiInputError(f"{where}: {key} has {rows} rows but its weight has {bounds[-1]}.")
            virtual[key] = [(bounds[p], bounds[p + 1]) for p in range(len(parts))]
            probes[key] = torch.cat([torch.full((n,), base + p, dtype=torch.float64)
                                     for p, n in enumerate(_FLUX_CONVERTER_PARTS)])
        else:
            probes[key] = base + torch.arange(rows, dtype=torch.float64)
    try:
        converted = _converter(family)(probes)
    except KeyError as error:
        missing = str(error.args[0]) if error.args else "a tensor"
        raise WadiInputError(f"{where} lacks {missing}, which a {_LABEL[family]} transformer with these blocks has "
                             "(an incomplete or partial file).") from None
    except (IndexError, RuntimeError, ValueError) as error:
        raise WadiInputError(f"{where} is not a {_LABEL[family]} original layout this tool recognises "
                             f"(diffusers' converter failed on it: {error}).") from None
    is_virtual_key = torch.tensor([key in virtual for key in keys], dtype=torch.bool)
    mapping: dict[str, list[Segment]] = {}
    for name, probe in converted.items():
        mapping[name] = _segments(probe, keys, virtual, is_virtual_key)
    taken = {segment.key for segments in mapping.values() for segment in segments}
    for key in probes:  # what the converter did not take stays under its own name
        if key not in taken:
            mapping.setdefault(key, [Segment(key, 0, shapes[key][0] if shapes[key] else 1)])
    return mapping


def _segments(probe: torch.Tensor, keys: list[str], virtual: Mapping[str, list[tuple[int, int]]],
              is_virtual_key: torch.Tensor) -> list[Segment]:
    """Decode a converted index tensor into row segments of stored keys (runs found with tensor ops: a Flux.1
    single block's linear1 alone has 21504 rows)."""
    values = probe.reshape(-1).to(torch.float64)
    key_ids = torch.div(values, _ROW_BITS, rounding_mode="floor")
    local = (values - key_ids * _ROW_BITS).long()
    key_ids = key_ids.long()
    is_virtual = is_virtual_key[key_ids]
    # a new run starts where the key changes, a virtual key's part id changes, or a plain key's row is not the next
    step = local[1:] - local[:-1]
    breaks = (key_ids[1:] != key_ids[:-1]) | torch.where(is_virtual[1:], step != 0, step != 1)
    starts = [0, *(torch.nonzero(breaks).reshape(-1) + 1).tolist()]
    ends = [*starts[1:], len(values)]
    segments: list[Segment] = []
    for start, end in zip(starts, ends):
        key, row = keys[int(key_ids[start])], int(local[start])
        if key in virtual:  # a run of one part id
            if end - start != _FLUX_CONVERTER_PARTS[row]:
                raise AssertionError(f"the converter split {key} at rows other than its parts")  # pragma: no cover
            segments.append(Segment(key, *virtual[key][row]))
        else:  # a run of consecutive rows of one key
            segments.append(Segment(key, row, row + (end - start)))
    return segments


class SplitSource:
    """Diffusers tensors cut out of an original file's stored tensors, read one tensor (its rows only) at a time.

    ``owner`` gives the file holding each stored key (with the key as stored, prefix and all); ``segments`` the
    rows of those keys that make each diffusers tensor. Reads go through the owner's ``rows`` when it has one
    (safetensors: a positioned read of just those rows), else through the whole stored tensor.
    """

    def __init__(self, path: Path, segments: Mapping[str, list[Segment]],
                 owner: Mapping[str, tuple[object, str]]) -> None:
        self.path = Path(path)
        self.segments = dict(segments)
        self._owner = dict(owner)  # original key (unprefixed) -> (TensorSource, stored key)
        self._by_stored = {stored: source for source, stored in self._owner.values()}

    def keys(self) -> list[str]:
        return list(self.segments)

    def stored(self, key: str) -> tuple[object, str]:
        """(source, stored key) of an unprefixed original key."""
        return self._owner[key]

    def source_of(self, stored: str) -> object:
        """The file source holding a stored key (as stored, prefix and all)."""
        return self._by_stored[stored]

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        source, stored = self._owner[key]
        return tuple(source.shape(stored))  # type: ignore[attr-defined]

    def shape(self, name: str) -> tuple[int, ...]:
        segments = self.segments[name]
        first = self._stored_shape(segments[0].key)
        if not first:
            return first
        return (sum(s.rows for s in segments), *first[1:])

    def dtype(self, name: str) -> torch.dtype:
        source, stored = self._owner[self.segments[name][0].key]
        return source.dtype(stored)  # type: ignore[attr-defined]

    def tensor(self, name: str) -> torch.Tensor:
        pieces = []
        for segment in self.segments[name]:
            source, stored = self._owner[segment.key]
            full = self._stored_shape(segment.key)
            if not full or (segment.start == 0 and segment.stop == full[0]):
                pieces.append(source.tensor(stored))  # type: ignore[attr-defined]
            elif hasattr(source, "rows"):
                pieces.append(source.rows(stored, segment.start, segment.stop))  # type: ignore[attr-defined]
            else:
                pieces.append(source.tensor(stored)[segment.start:segment.stop].clone())  # type: ignore[attr-defined]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def describe(self, name: str) -> str:
        """Where a diffusers tensor lives: ``key`` or ``key[a:b]`` (+ ``key[c:d]`` …), with stored keys."""
        parts = []
        for segment in self.segments[name]:
            _, stored = self._owner[segment.key]
            full = self._stored_shape(segment.key)
            whole = not full or (segment.start == 0 and segment.stop == full[0])
            parts.append(stored if whole else f"{stored}[{segment.start}:{segment.stop}]")
        return " + ".join(parts)

    def close(self) -> None:
        """The owning file sources are closed by the checkpoint that holds them."""

