"""Checks that the probe's outputs cannot hurt its inputs or be lost, made before any computation starts.

An output path that resolves to an input (the same file, or a file inside an input folder's weights) is refused;
two outputs at the same place are refused; every output's folder must exist or be creatable and writable. The
writes themselves are atomic (:mod:`wadi_probe.io.atomic`), so a failure later leaves earlier files as they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from wadi_probe.builtins import is_builtin, resolve_builtin
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import unwritable_reason


def input_files(spec: object) -> set[Path]:
    """The resolved files an input checkpoint path stands for (a folder: every file under it; builtin names too)."""
    if not isinstance(spec, (str, os.PathLike)):
        return set()
    path = Path(resolve_builtin(str(spec)) if is_builtin(str(spec)) else spec).expanduser()
    if path.is_dir():
        return {p.resolve() for p in path.rglob("*") if p.is_file()} | {path.resolve()}
    return {path.resolve()} if path.exists() else set()


def _check_writable(folder: Path) -> None:
    reason = unwritable_reason(folder)
    if reason is not None:
        raise WadiInputError(f"cannot write into {folder} ({reason}); choose another output path.")


def check_outputs(outputs: Mapping[str, Path | None], inputs: Iterable[object], *, folders: Iterable[str] = ()) -> None:
    """Refuse outputs that are inputs, collide with each other or cannot be written; ``outputs`` maps a
    description ("report", "CSV", "plots folder") to a path (None: not asked for); ``folders`` names the
    descriptions that are folders."""
    folder_kinds = set(folders)
    protected: set[Path] = set()
    for spec in inputs:
        protected |= input_files(spec)
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        path = Path(path).expanduser()
        resolved = path.resolve()
        if resolved in protected:
            raise WadiInputError(f"the {what} path {path} is one of the inputs; write it to a new file.")
        if what in folder_kinds:
            if path.exists() and not path.is_dir():
                raise WadiInputError(f"the {what} {path} is a file; give a folder.")
            if any(p == resolved or resolved in p.parents for p in protected if p.is_dir()):
                raise WadiInputError(f"the {what} {path} is inside an input checkpoint folder; choose another folder.")
        elif path.is_dir():
            raise WadiInputError(f"the {what} path {path} is a folder; give a file name.")
        if resolved in seen:
            raise WadiInputError(f"the {what} and the {seen[resolved]} would both be written to {path}.")
        seen[resolved] = what
        _check_writable(path if what in folder_kinds else path.parent)
