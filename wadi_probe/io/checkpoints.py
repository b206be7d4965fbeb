"""Open any checkpoint layout users have as one lazy, uniformly named set of tensors (docs/checkpoints.md).

A :class:`Checkpoint` maps normalised diffusers-style names (``down_blocks.0.attentions.0.proj_in.weight``, no
``unet.``/``module.`` prefix) to where each tensor lives in the file(s). Opening reads only headers and indexes;
:meth:`Checkpoint.tensor` reads one tensor. Layouts:

- ``safetensors``: one ``.safetensors`` file in diffusers naming;
- ``diffusers`` / ``diffusers-sharded``: a model folder (or a pipeline root with ``unet/`` or ``transformer/``),
  ``.fp16`` variants, sharded files with their ``*.index.json``;
- ``ldm``: an original LDM/CompVis single file, ``model.diffusion_model.*`` renamed to diffusers names
  (:mod:`wadi_probe.io.ldm`), VAE and text-encoder keys ignored;
- ``flux`` / ``sd3``: a Flux.1 or SD3/SD3.5 original single file (:mod:`wadi_probe.io.flow`), fused ``qkv`` /
  ``linear1`` tensors cut into their diffusers tensors as they are read (:class:`OriginalCheckpoint`);
- ``torch``: ``.bin``/``.pt``/``.ckpt`` loaded with ``weights_only=True`` only;
- ``adapter``: a LoRA / kohya / LoRaD file merged onto a base checkpoint on the fly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from wadi_probe.io.atomic import atomic_path
from wadi_probe.errors import WadiInputError
from wadi_probe.io.formats.safetensors_io import SafetensorsSource, write_safetensors_streaming
from wadi_probe.io.names import MODEL_PREFIXES, WRAPPER_PREFIXES
from wadi_probe.io.jsonfile import read_json

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LDM_UNET_PREFIX = "model.diffusion_model."
# prefixes removed when every (kept) key carries them
_WRAPPER_PREFIXES = WRAPPER_PREFIXES
_MODEL_PREFIXES = (*MODEL_PREFIXES, "model.")
# diffusers / transformers weight files, most preferred first: full precision before variants, safetensors before
# torch, single files and shard indexes alike (diffusers names a variant index "….safetensors.index.fp16.json")
_WEIGHT_FILE_NAMES = tuple(
    name
    for extension in ("safetensors", "bin")
    for variant in ("", "fp16", "bf16")
    for base in ("diffusion_pytorch_model", "model", "pytorch_model")
    for name in (
        (f"{base}.{extension}", f"{base}.{extension}.index.json")
        if not variant
        else (f"{base}.{variant}.{extension}", f"{base}.{extension}.index.{variant}.json",
              f"{base}.{variant}.{extension}.index.json")
    )
)
_SHARD_INDEX = re.compile(r"\.index(\.[A-Za-z0-9_-]+)?\.json$")


class TensorSource(Protocol):
    """One file (or loaded dict) of raw keys; implemented by the format readers."""

    path: Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def tensor(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...


class Checkpoint:
    """A lazily opened checkpoint: normalised names -> (source file, stored key).

    Tensors come back one at a time, on the CPU, in the dtype they are stored in. Use as a context manager or
    call :meth:`close` when done.
    """

    def __init__(
        self,
        path: Path,
        layout: str,
        entries: Mapping[str, tuple[TensorSource, str]],
        *,
        sources: list[TensorSource] | None = None,
        ignored_keys: list[str] | None = None,
        info: dict[str, Any] | None = None,
        ignored_sources: Mapping[str, TensorSource] | None = None,
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self._entries = {name: entries[name] for name in sorted(entries, key=model_order_key)}
        self._sources = sources if sources is not None else list({id(s): s for s, _ in self._entries.values()}.values())
        self.ignored_keys = list(ignored_keys or [])
        self._ignored_sources = dict(ignored_sources or {})
        self.info = dict(info or {})

    # ---- names and metadata -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Normalised diffusers-style names, in the order the model stores them."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> tuple[TensorSource, str]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        source, key = self._entry(name)
        return tuple(source.shape(key))

    def dtype(self, name: str) -> torch.dtype:
        source, key = self._entry(name)
        return source.dtype(key)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype in the file(s); differs from :meth:`dtype` only for merged adapter views."""
        return self.dtype(name)

    def source_key(self, name: str) -> str:
        """The key as stored in the file(s)."""
        return self._entry(name)[1]

    def source_file(self, name: str) -> Path:
        """The file holding ``name`` (differs per tensor for sharded checkpoints)."""
        return self._entry(name)[0].path

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype) and nothing else."""
        source, key = self._entry(name)
        return source.tensor(key)

    # ---- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        for source in self._sources:
            source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, layout={self.layout!r}, tensors={len(self)})"


class OriginalCheckpoint(Checkpoint):
    """A Flux.1 or SD3/SD3.5 original single file under diffusers names (:mod:`wadi_probe.io.flow`).

    Fused stored tensors (``qkv``, Flux's ``linear1``) are cut into their diffusers tensors when read, one tensor
    at a time; :meth:`source_key` names the stored rows (``…img_attn.qkv.weight[0:3072]``), and
    :meth:`stored_parts` tells :func:`write_like` how to put diffusers tensors back into the stored ones.
    """

    def __init__(self, path: Path, layout: str, entries: Mapping[str, tuple[TensorSource, str]], split: Any,
                 **kwargs: Any) -> None:
        super().__init__(path, layout, entries, **kwargs)
        self.split = split

    def source_key(self, name: str) -> str:
        self._entry(name)
        return self.split.describe(name)

    def source_file(self, name: str) -> Path:
        source, _ = self.split.stored(self.split.segments[self._entry(name)[1]][0].key)
        return source.path

    def stored_parts(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """{stored key: [(diffusers name, first row of the name, first stored row, rows), …]} in file order."""
        parts: dict[str, list[tuple[str, int, int, int]]] = {}
        for name in self.names():
            offset = 0
            for segment in self.split.segments[name]:
                _, stored = self.split.stored(segment.key)
                parts.setdefault(stored, []).append((name, offset, segment.start, segment.rows))
                offset += segment.rows
        return parts

    def original_modules(self) -> dict[str, list[tuple[str, list[tuple[int, int]]]]]:
        """{the file's module (``double_blocks.0.img_attn.qkv``): [(diffusers module, its row ranges), …]}, for
        adapters written against the original names (a LoRA on a fused ``qkv`` is split by these rows)."""
        modules: dict[str, list[tuple[str, list[tuple[int, int]]]]] = {}
        for name in self.names():
            if not name.endswith(".weight"):
                continue
            segments = self.split.segments[name]
            if len({segment.key for segment in segments}) != 1 or not segments[0].key.endswith(".weight"):
                continue
            original = segments[0].key[: -len(".weight")]
            modules.setdefault(original, []).append(
                (name[: -len(".weight")], [(segment.start, segment.stop) for segment in segments]))
        return modules

    def stored_spec(self, stored: str) -> tuple[tuple[int, ...], torch.dtype, TensorSource]:
        """Shape, dtype and file of a stored key."""
        source = self.split.source_of(stored)
        return tuple(source.shape(stored)), source.dtype(stored), source


# top-level modules of UNet2DConditionModel / diffusers transformers, in the order a forward pass meets them
_TOP_LEVEL_ORDER = {
    name: rank
    for rank, name in enumerate(
        ("conv_in", "pos_embed", "patch_embed", "x_embedder", "time_proj", "time_embedding", "time_embed",
         "time_text_embed", "adaln_single", "class_embedding", "add_time_proj", "add_embedding",
         "encoder_hid_proj", "caption_projection", "context_embedder", "img_in", "txt_norm", "txt_in",
         "t_embedder", "cap_embedder", "noise_refiner", "context_refiner", "down_blocks", "layers", "transformer_blocks",
         "single_transformer_blocks", "mid_block", "up_blocks", "norm_out", "conv_norm_out", "proj_out",
         "scale_shift_table", "conv_out")
    )
}
_SUBBLOCK_ORDER = {"resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2}


def architecture_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    """Tensor names that tell two checkpoints' architectures apart: present in only one (sorted), else of another
    shape; empty when both hold the same names with the same shapes."""
    shapes_a = {name: a.shape(name) for name in a.names()}
    shapes_b = {name: b.shape(name) for name in b.names()}
    only_one = sorted(set(shapes_a) ^ set(shapes_b))
    return only_one or [name for name in shapes_a if shapes_a[name] != shapes_b[name]]


def model_order_key(name: str) -> tuple:
    """Sort key that puts names in forward-pass order, whatever order the file stored them in.

    Numbers compare as numbers (``blocks.10`` after ``blocks.2``); within a UNet block, resnet ``l`` comes
    before attention ``l`` and the down/upsampler last; ``weight`` before ``bias``.
    """
    parts = name.split(".")
    key: list[tuple] = [(0, _TOP_LEVEL_ORDER.get(parts[0], len(_TOP_LEVEL_ORDER)), parts[0])]
    i = 1
    while i < len(parts):
        part = parts[i]
        if part in _SUBBLOCK_ORDER and i + 1 < len(parts) and parts[i + 1].isdigit():
            key.append((1, int(parts[i + 1]), _SUBBLOCK_ORDER[part]))
            i += 2
            continue
        if part.isdigit():
            key.append((1, int(part), 0))
        else:
            key.append((2, {"weight": 0, "bias": 1}.get(part, 2), part))
        i += 1
    return tuple(key)


# ---- key normalisation -------------------------------------------------------------------------------------
def _strip_common_prefix(keys: list[str], prefixes: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Map name -> key after removing wrapper prefixes that every key carries; pick ``unet.``-style sub-models.

    Returns the name map and the keys that were left out (other sub-models of a whole-pipeline file).
    """
    current = {k: k for k in keys}
    ignored: list[str] = []
    changed = True
    while changed and current:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in current):
                current = {name[len(prefix):]: key for name, key in current.items()}
                changed = True
    for prefix in prefixes:
        with_prefix = {name: key for name, key in current.items() if name.startswith(prefix)}
        if not with_prefix:
            continue
        # strip when all keys share it, or when it names a sub-model next to others (unet. beside text_encoder.)
        if len(with_prefix) == len(current) or prefix in ("unet.", "transformer."):
            ignored.extend(key for name, key in current.items() if not name.startswith(prefix))
            current = {name[len(prefix):]: key for name, key in with_prefix.items()}
            break
    return current, ignored


def _entries_from_sources(
    path: Path, layout: str, sources: list[TensorSource], key_owner: dict[str, TensorSource] | None = None
) -> Checkpoint:
    """Build a checkpoint from raw sources, choosing the LDM renaming or plain prefix stripping by key names."""
    owner: dict[str, TensorSource] = dict(key_owner or {})
    if not owner:
        for source in sources:
            for key in source.keys():
                owner.setdefault(key, source)
    keys = list(owner)
    if not keys:
        raise WadiInputError(f"{path} holds no tensors.")
    unwrapped, _ = _strip_common_prefix(keys, ())
    ldm_keys = [name for name in unwrapped if name.startswith(LDM_UNET_PREFIX)]
    original = _open_original(path, sources, owner, unwrapped, ldm_keys)
    if original is not None:
        return original
    if not ldm_keys:
        _refuse_without_denoiser(path, list(unwrapped))
    if ldm_keys:
        from wadi_probe.io.ldm import ldm_to_diffusers_names

        shapes = {name[len(LDM_UNET_PREFIX):]: tuple(owner[unwrapped[name]].shape(unwrapped[name])) for name in ldm_keys}
        mapping = ldm_to_diffusers_names(shapes)
        entries = {}
        for ldm_name, diffusers_name in mapping.items():
            key = unwrapped[LDM_UNET_PREFIX + ldm_name]
            entries[diffusers_name] = (owner[key], key)
        mapped_keys = {key for _, key in entries.values()}
        ignored = [key for key in keys if key not in mapped_keys]
        return Checkpoint(path, "ldm", entries, sources=sources, ignored_keys=ignored,
                          ignored_sources={key: owner[key] for key in ignored})
    names, ignored = _strip_common_prefix(keys, _MODEL_PREFIXES)
    _refuse_adapter_names(path, names)
    entries = {name: (owner[key], key) for name, key in names.items()}
    return Checkpoint(path, layout, entries, sources=sources, ignored_keys=ignored,
                      ignored_sources={key: owner[key] for key in ignored})


# sub-models a single file or folder may hold beside (or instead of) the denoiser
_NOT_DENOISER = re.compile(r"^(first_stage_model|vae|cond_stage_model|conditioner|text_encoders?(_\d)?|"
                           r"te\d?)\.")
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _refuse_without_denoiser(path: Path, names: list[str]) -> None:
    """One sentence for a file that holds only a VAE and/or text encoders (an SD3 file with the VAE only, say)."""
    if names and all(_NOT_DENOISER.match(name) for name in names):
        found = sorted({name.split(".", 1)[0] + ".*" for name in names})
        raise WadiInputError(f"{path} holds no denoiser, only {', '.join(found[:4])} (VAE / text-encoder weights); "
                             "give the file or folder with the UNet or transformer.")
    if names and all(name.startswith(_VAE_ROOTS) for name in names) and any(n.startswith("decoder.") for n in names):
        raise WadiInputError(f"{path} is a VAE (encoder/decoder weights), not a denoiser; give the UNet or "
                             "transformer file or folder.")


def _open_original(path: Path, sources: list[TensorSource], owner: Mapping[str, TensorSource],
                   unwrapped: Mapping[str, str], ldm_keys: list[str]) -> Checkpoint | None:
    """A Flux.1 or SD3/SD3.5 original single file (with or without ``model.diffusion_model.``), else None."""
    from wadi_probe.io.flow import SplitSource, original_family, original_to_diffusers

    prefix = LDM_UNET_PREFIX if ldm_keys else ""
    own = {name[len(prefix):]: key for name, key in unwrapped.items() if name.startswith(prefix)}
    family = original_family(list(own))
    if family is None:
        return None
    if not prefix:  # an unprefixed original file is the transformer alone; set other sub-models aside
        own = {name: key for name, key in own.items() if not _NOT_DENOISER.match(name)}
    shapes = {name: tuple(owner[key].shape(key)) for name, key in own.items()}
    segments = original_to_diffusers(shapes, family, str(path))
    split = SplitSource(path, segments, {name: (owner[key], key) for name, key in own.items()})
    used = {own[segment.key] for parts in segments.values() for segment in parts}
    ignored = [key for key in owner if key not in used]
    return OriginalCheckpoint(path, family, {name: (split, name) for name in segments}, split, sources=sources,
                              ignored_keys=ignored, ignored_sources={key: owner[key] for key in ignored})


class AdapterWithoutBase(WadiInputError):
    """An adapter (LoRA/LoRaD weights) was opened where a full model is needed; ``path`` says which."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} is an adapter (LoRA/LoRaD weights), not a full model; it is read on top of the "
                         "model it was trained from (open_checkpoint(path, base=that model)).")


def _refuse_adapter_names(path: Path, names: Mapping[str, str]) -> None:
    from wadi_probe.io.formats.adapters import looks_like_adapter

    if looks_like_adapter(list(names)):
        raise AdapterWithoutBase(path)


# ---- opening ------------------------------------------------------------------------------------------------
def _open_file(path: Path, layout: str) -> TensorSource:
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in TORCH_SUFFIXES:
        from wadi_probe.io.formats.torch_io import TorchSource

        return TorchSource(path)
    raise WadiInputError(
        f"{path} has an unknown extension; expected .safetensors, {', '.join(TORCH_SUFFIXES)} or a diffusers folder."
    )


def _open_sharded(index_path: Path) -> Checkpoint:
    """Open a sharded checkpoint through its ``*.index.json`` (each shard opened lazily)."""
    try:
        index = read_json(index_path)
        weight_map: dict[str, str] = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WadiInputError(f"{index_path} is not a valid shard index (it needs a 'weight_map' object).") from exc
    shards: dict[str, TensorSource] = {}
    owner: dict[str, TensorSource] = {}
    for key, shard_name in weight_map.items():
        if shard_name not in shards:
            shard_path = index_path.parent / shard_name
            if not shard_path.is_file():
                raise WadiInputError(f"{index_path} names shard {shard_name}, which does not exist in {index_path.parent}.")
            shards[shard_name] = _open_file(shard_path, "diffusers-sharded")
        owner[key] = shards[shard_name]
    for shard_name, source in shards.items():
        missing = [key for key in owner if owner[key] is source and key not in set(source.keys())]
        if missing:
            raise WadiInputError(f"{index_path} says shard {shard_name} holds {missing[0]!r}, but it does not.")
    return _entries_from_sources(index_path.parent, "diffusers-sharded", list(shards.values()), owner)


def denoiser_folder(path: str | Path) -> Path:
    """The denoiser's own folder: ``unet/`` or ``transformer/`` of a pipeline root, else ``path`` itself.

    The one place a pipeline root is told from a model folder: weights and ``config.json`` are both looked up here.
    """
    path = Path(path)
    for sub in ("unet", "transformer"):
        if (path / sub).is_dir():
            return path / sub
    return path


def find_weights_file(folder: Path) -> Path:
    """The weights file (or shard index) of a diffusers model folder or pipeline root."""
    folder = denoiser_folder(folder)
    for name in _WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WadiInputError(
            f"{folder} holds no model weights (expected diffusion_pytorch_model[.fp16].safetensors, a shard index, "
            "or a unet/ or transformer/ subfolder)."
        )
    raise WadiInputError(f"{folder} holds several weight files ({', '.join(p.name for p in candidates)}); name one of them.")


def open_checkpoint(path: str | Path, *, base: Checkpoint | None = None) -> Checkpoint:
    """Open a checkpoint lazily (only headers and indexes are read).

    ``base``: when ``path`` is an adapter (LoRA in diffusers/PEFT or kohya layout, or LoRaD ``theta_a``/``theta_b``),
    the result presents ``base`` with the adapter merged in, under the base's names (layout ``"adapter"``).
    Raises :class:`WadiInputError` for a missing path, a folder without weights, a corrupt or truncated file, or a
    pickle that would need code to load.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WadiInputError(f"{path} does not exist.")
    if base is not None:
        return open_adapter(path, base)
    if path.is_dir():
        weights = find_weights_file(path)
        layout = "diffusers"
    else:
        weights = path
        layout = "safetensors" if path.suffix == ".safetensors" else "torch"
    if _SHARD_INDEX.search(weights.name):
        checkpoint = _open_sharded(weights)
        checkpoint.path = path
        return checkpoint
    if weights.suffix in (".json", ".txt", ".yaml", ".md"):
        raise WadiInputError(f"{weights} is not a weights file.")
    source = _open_file(weights, layout)
    checkpoint = _entries_from_sources(path, layout, [source])
    if getattr(source, "nesting", ()):
        checkpoint.info["nesting"] = tuple(source.nesting)
    if checkpoint.layout == "torch" and path.is_dir():
        checkpoint.layout = "diffusers"
    return checkpoint


def open_adapter(path: Path, base: Checkpoint) -> "AdapterCheckpoint":
    """Open ``path`` as an adapter merged onto ``base`` (:mod:`wadi_probe.io.formats.adapters` reads it)."""
    from wadi_probe.io.formats.adapters import lora_scale, read_adapter, resolve_targets

    parsed = read_adapter(path)
    original_modules = base.original_modules() if isinstance(base, OriginalCheckpoint) else None
    targets, problems = resolve_targets(parsed, base.names(), base.shape, original_modules)
    for module, problem, target in problems:
        if problem == "missing" and original_modules is None and re.search(r"(double|single|joint)_blocks[._]\d", module):
            raise WadiInputError(
                f"the adapter {parsed.path} names module {module} of Flux's/SD3's original single-file layout; give "
                "the teacher as that original file, so the LoRA's fused rows can be split into its diffusers layers."
            )
        if problem == "missing":
            raise WadiInputError(
                f"the adapter {parsed.path} changes module {module}, which {base.path} does not have "
                "(is the adapter meant for another model?)."
            )
        raise WadiInputError(
            f"the adapter's factors for {module} do not fit {base.path}'s weight of shape "
            f"{base.shape(f'{target}.weight')} (is the adapter meant for another model?)."
        )
    weights = {
        f"{target}.weight": (entry, lora_scale(entry, module, parsed.config) if entry.family == "lora" else 1.0)
        for target, (module, entry) in targets.items()
    }
    return AdapterCheckpoint(Path(path), base, weights, parsed)


class AdapterCheckpoint(Checkpoint):
    """``base`` with an adapter merged into the named weights, computed one tensor at a time."""

    def __init__(self, path: Path, base: Checkpoint, targets: dict[str, tuple[Any, float]], parsed: Any) -> None:
        super().__init__(
            path, "adapter", dict(base._entries), sources=[],
            ignored_keys=parsed.ignored_keys,
            info={"base": str(base.path), "base_layout": base.layout, "adapter_file": str(parsed.path),
                  "adapted": len(targets), "families": sorted({entry.family for entry, _ in targets.values()})},
        )
        self.base = base
        self.targets = targets
        # writing the merged view in the base's layout keeps the base's other keys and nesting
        self._ignored_sources = dict(base._ignored_sources)
        if "nesting" in base.info:
            self.info["nesting"] = base.info["nesting"]

    def adapted_names(self) -> list[str]:
        """Names whose tensors the adapter changes."""
        return [name for name in self.names() if name in self.targets]

    def dtype(self, name: str) -> torch.dtype:
        base_dtype = self.base.dtype(name)
        return torch.promote_types(base_dtype, torch.float32) if name in self.targets else base_dtype

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        from wadi_probe.io.formats.adapters import merge_module

        weight = self.base.tensor(name)
        if name not in self.targets:
            return weight
        entry, scale = self.targets[name]
        return merge_module(weight, entry, scale)

    def close(self) -> None:
        """Drops the adapter factors; the base stays open (its owner closes it)."""
        self.targets = {}


# ---- writing ------------------------------------------------------------------------------------------------
def stored_bytes(reference: Checkpoint, *, keep_other_keys: bool = True) -> int:
    """The tensor bytes :func:`write_like` writes for ``reference`` (every tensor in its stored dtype), so a free
    space check can be made before the write starts."""
    total = sum(math.prod(reference.shape(n)) * reference.stored_dtype(n).itemsize for n in reference.names())
    if keep_other_keys:
        total += sum(math.prod(source.shape(key)) * source.dtype(key).itemsize
                     for key, source in reference._ignored_sources.items())
    return total


def write_like(
    reference: Checkpoint,
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    keep_other_keys: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (keyed by normalised names) under ``reference``'s stored keys and dtypes, atomically.

    The result is a drop-in replacement for the reference file: same keys (an LDM file keeps its
    ``model.diffusion_model.`` names), same dtypes, and with ``keep_other_keys`` the keys the probe ignores (VAE,
    text encoder) copied over unchanged. ``.safetensors`` is written one tensor at a time, so ``tensors`` may be a
    lazy mapping (:func:`lazy_tensors`) and a swapped checkpoint never sits in memory; a path ending
    ``.bin``/``.pt``/``.pth``/``.ckpt`` gets a torch file (nested like the reference). Unknown names are refused
    up front; a wrong shape aborts the write; either way an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    unknown = [name for name in tensors.keys() if name not in reference]
    if unknown:
        raise WadiInputError(f"{unknown[0]!r} is not a tensor of {reference.path}, so it cannot be written in its layout.")
    ordered = [name for name in reference.names() if name in tensors]
    fetchers: dict[str, Callable[[], torch.Tensor]] = {}
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    # an original Flux/SD3 file (or an adapter merged onto one) is written back in its fused layout
    fused = reference.base if isinstance(reference, AdapterCheckpoint) else reference
    if isinstance(fused, OriginalCheckpoint):
        _fused_fetchers(fused, tensors, set(ordered), fetchers, specs)
    for name in ordered if not isinstance(fused, OriginalCheckpoint) else ():
        key = reference.source_key(name)
        specs[key] = (reference.shape(name), reference.stored_dtype(name))
        fetchers[key] = lambda name=name: tensors[name]
    if keep_other_keys:
        for key, source in reference._ignored_sources.items():
            if key not in specs:
                specs[key] = (tuple(source.shape(key)), source.dtype(key))
                fetchers[key] = lambda key=key, source=source: source.tensor(key)

    if path.suffix in TORCH_SUFFIXES:
        state: dict[str, torch.Tensor] = {}
        for key, fetch in fetchers.items():
            shape, dtype = specs[key]
            tensor = fetch()
            if tuple(tensor.shape) != tuple(shape):
                raise WadiInputError(f"tensor {key!r} has shape {tuple(tensor.shape)} but {tuple(shape)} is required.")
            state[key] = tensor.detach().to("cpu", dtype).contiguous()
        obj: Any = state
        for nest in reversed(reference.info.get("nesting", ())):
            obj = {nest: obj}
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
        return path
    if path.suffix != ".safetensors":
        raise WadiInputError(f"{path} should end in .safetensors (or .bin/.pt/.ckpt for a torch file).")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            write_safetensors_streaming(handle, list(fetchers), specs, lambda key: fetchers[key](), metadata)
    return path


def _fused_fetchers(reference: OriginalCheckpoint, tensors: Mapping[str, torch.Tensor], wanted: set[str],
                    fetchers: dict[str, Callable[[], torch.Tensor]],
                    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Stored keys of an original Flux/SD3 file rebuilt from diffusers tensors (the rows of each part put back).

    A stored key some of whose parts are not in ``tensors`` keeps the reference's rows there; one stored tensor
    is in memory at a time.
    """
    for stored, parts in reference.stored_parts().items():
        if not any(name in wanted for name, *_ in parts):
            continue
        shape, dtype, source = reference.stored_spec(stored)

        def assemble(stored: str = stored, parts: list = parts, shape: tuple = shape, dtype: torch.dtype = dtype,
                     source: Any = source) -> torch.Tensor:
            whole = (source.tensor(stored).clone() if not all(name in wanted for name, *_ in parts)
                     else torch.empty(shape, dtype=dtype))
            for name, name_start, stored_start, rows in parts:
                if name in wanted:
                    value = tensors[name]
                    if tuple(value.shape) != reference.shape(name):
                        raise WadiInputError(f"tensor {name!r} has shape {tuple(value.shape)} but "
                                             f"{reference.shape(name)} is required.")
                    whole[stored_start:stored_start + rows] = value[name_start:name_start + rows].to(dtype)
            return whole

        specs[stored] = (shape, dtype)
        fetchers[stored] = assemble


def lazy_tensors(checkpoint: Checkpoint, names: list[str] | None = None,
                 override: Callable[[str], torch.Tensor | None] | None = None) -> Mapping[str, torch.Tensor]:
    """A read-on-access mapping of a checkpoint's tensors (optionally replaced by ``override``), for write_like."""
    return _LazyTensors(checkpoint, names if names is not None else checkpoint.names(), override)


class _LazyTensors(Mapping[str, torch.Tensor]):
    def __init__(self, checkpoint: Checkpoint, names: list[str], override: Callable[[str], torch.Tensor | None] | None):
        self._checkpoint, self._names, self._override = checkpoint, names, override

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if self._override is not None:
            replaced = self._override(name)
            if replaced is not None:
                return replaced
        return self._checkpoint.tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def name_filter(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    """A predicate for ``--include``/``--exclude`` regexes (searched anywhere in the name)."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as error:
        raise WadiInputError(f"invalid name pattern: {error}.") from error
    return lambda name: (inc is None or inc.search(name) is not None) and (exc is None or exc.search(name) is None)
