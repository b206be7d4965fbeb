"""Checkpoints known by name: ``builtin:digits`` and the like, resolved to the files the project ships.

The weights live in the package that trains and ships them (``wadi_distill``). ``wadi_probe`` must stay usable
without it, so the name is resolved by locating that package's folder on the import path
(:func:`importlib.util.find_spec` of a top-level package finds it without importing it) and joining a fixed
relative path; nothing of ``wadi_distill`` is imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wadi_probe.errors import WadiInputError

PREFIX = "builtin:"

#: name -> (top-level package that ships it, path of its UNet weights inside that package)
BUILTIN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "digits": ("wadi_distill", "builtin/digits/digits_unet.safetensors"),
}


def is_builtin(spec: object) -> bool:
    """True for a ``builtin:NAME`` checkpoint name."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def builtin_path(name: str) -> Path:
    """The file behind ``builtin:NAME`` (``name`` with or without the prefix)."""
    name = name.removeprefix(PREFIX)
    if name not in BUILTIN_CHECKPOINTS:
        known = ", ".join(PREFIX + key for key in BUILTIN_CHECKPOINTS)
        raise WadiInputError(f"{PREFIX}{name} is not a built-in checkpoint; the built-in ones are {known}.")
    package, relative = BUILTIN_CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WadiInputError(f"{PREFIX}{name} ships with the {package} package, which is not installed.")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise WadiInputError(f"{PREFIX}{name} should be at {path}, but that file is missing from the installation.")
    return path


def resolve_builtin(spec: str | Path) -> str | Path:
    """``builtin:NAME`` -> its file; any other path unchanged."""
    return builtin_path(spec) if is_builtin(spec) else spec
