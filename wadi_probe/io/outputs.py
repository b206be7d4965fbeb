"""The one output guard of both command lines: nothing a command is given is ever overwritten, replaced or deleted.

Every command that writes calls :func:`check_outputs` before any work, with every path it will write and every
path it reads. The rules (docs/design.md states them for users):

- an output that **is** an input, **links** to one (a symbolic link anywhere on its path, or a hard link to the
  same file), or lies **inside** an input folder is refused;
- a folder the command owns (a run folder, the demo's folder) or writes whole (an exported diffusers folder) is
  also refused when it **holds** an input; a folder that files are only added to (a plots folder) may hold inputs,
  because the files it gets are checked one by one;
- a folder written whole replaces an existing non-empty folder only with ``overwrite=True`` (``--overwrite``),
  and never the current folder or one above it;
- two outputs at one place are refused; every output's nearest existing folder must accept a new file (a real
  file creation, so root, read-only mounts and ACLs answer truthfully); where the size of an output is known, the
  free space must hold it.

Each refusal is one :class:`~wadi_probe.errors.WadiInputError` sentence. The writes themselves go through
:func:`wadi_probe.io.atomic.atomic_path`, so a write that fails later (a full disk) leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from wadi_probe.builtins import is_builtin, resolve_builtin
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import unwritable_reason

__all__ = ["check_outputs", "check_free_space", "check_file_name", "input_paths"]

PathLike = str | os.PathLike[str]


@dataclass
class _Inputs:
    """The places the inputs occupy: resolved path -> the input as the user gave it (for the sentence)."""

    paths: dict[Path, str] = field(default_factory=dict)
    _inodes: dict[tuple[int, int], str] | None = None

    def add(self, spec: object) -> None:
        if spec is None or not isinstance(spec, (str, os.PathLike)):
            return
        given = str(spec)
        if is_builtin(given):  # a built-in model is its whole shipped folder (weights, config, classifier)
            try:
                path = Path(resolve_builtin(given)).parent
            except WadiInputError:
                return  # an unknown name: the command refuses it itself, with its own sentence
        else:
            path = Path(spec).expanduser()
        if not path.exists():
            return  # the command refuses a missing input itself, with its own sentence
        self.paths.setdefault(path.resolve(), given)
        if path.is_dir():  # links inside an input folder (a Hugging Face snapshot) point at the real files
            for link in _links_under(path):
                self.paths.setdefault(link.resolve(), given)

    def inodes(self) -> dict[tuple[int, int], str]:
        """(device, inode) of every input file, for hard links; walked only when an output has several links."""
        if self._inodes is None:
            self._inodes = {}
            for path, given in self.paths.items():
                files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
                for file in files:
                    stat = file.stat()
                    self._inodes.setdefault((stat.st_dev, stat.st_ino), given)
        return self._inodes


def _links_under(folder: Path) -> Iterable[Path]:
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                yield Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))


def input_paths(inputs: Iterable[object]) -> dict[Path, str]:
    """The resolved places of ``inputs`` (paths, folders, ``builtin:`` names; None and non-paths skipped)."""
    found = _Inputs()
    for spec in inputs:
        found.add(spec)
    return found.paths


def nearest_existing(path: PathLike) -> Path:
    """``path`` (made absolute) or its closest ancestor that exists: where a file that is yet to be written would
    land, for asking its file system about space."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def check_free_space(path: PathLike, size: int, what: str = "output") -> None:
    """Refuse to start writing ``size`` bytes at ``path`` when its file system has less space free."""
    where = nearest_existing(path)
    if not where.is_dir():
        where = where.parent
    free = shutil.disk_usage(where).free
    if size > free:
        raise WadiInputError(f"the {what} {path} needs about {_mb(size)}, but only {_mb(free)} are free on the disk "
                             f"holding {where}; free some space or write it elsewhere.")


def check_file_name(name: str, what: str) -> str:
    """Refuse a name that is to become one file inside an output folder but would land elsewhere or hidden
    (``../x``, ``/abs``, ``a/b``, ``.``, empty); returns the name."""
    separators = {os.sep, os.altsep or os.sep, "/"}
    if not name.strip():
        raise WadiInputError(f"a {what} must not be empty: it names a file inside the output folder.")
    if name.startswith(".") or any(sep in name for sep in separators):
        raise WadiInputError(f"the {what} {name!r} cannot be a file name inside the output folder; use a plain "
                             "name without '/' or a leading '.'.")
    return name


def _refuse_overlap(what: str, path: Path, resolved: Path, inputs: _Inputs, *, holds: bool) -> None:
    for place, given in inputs.paths.items():
        if place == resolved:
            how = "links to" if Path(os.path.abspath(path)) != resolved else "is"
            raise WadiInputError(f"the {what} {path} {how} the input {given}; write it somewhere else.")
        if place in resolved.parents:
            raise WadiInputError(f"the {what} {path} is inside the input {given}; write it somewhere else.")
        if holds and resolved in place.parents:
            raise WadiInputError(f"the {what} {path} holds the input {given}; choose a folder that holds no input.")


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Iterable[object], *, folders: Iterable[str] = (),
                  owned: Iterable[str] = (), replaced: Iterable[str] = (), sizes: Mapping[str, int] | None = None,
                  overwrite: bool = False) -> None:
    """Refuse, before any work, outputs that could destroy an input, collide, or cannot be written.

    ``outputs`` maps a description ("report", "plots folder") to a path (None: not asked for); ``inputs`` are
    the paths the command reads (files, folders, ``builtin:`` names; None is skipped). The descriptions named in
    ``folders`` are folders that files are added to, in ``owned`` folders the command fills as it likes (a run
    folder), in ``replaced`` folders written whole; every other output is a file. ``sizes`` gives the bytes of an
    output where they are known beforehand (checked against the free space); ``overwrite`` lets a ``replaced``
    folder that exists and is not empty be replaced.
    """
    into, own, whole = set(folders), set(owned), set(replaced)
    found = _Inputs()
    for spec in inputs:
        found.add(spec)
    seen: dict[Path, str] = {}
    cwd = Path.cwd().resolve()
    for what, given in outputs.items():
        if given is None:
            continue
        path = Path(given).expanduser()
        resolved = path.resolve()
        folder = what in into | own | whole
        _refuse_overlap(what, path, resolved, found, holds=what in own | whole)
        if folder and path.exists() and not path.is_dir():
            raise WadiInputError(f"the {what} {path} is a file; give a folder.")
        if not folder and path.is_dir():
            raise WadiInputError(f"the {what} {path} is a folder; give a file name.")
        if not folder and path.is_file() and path.stat().st_nlink > 1:
            stat = path.stat()
            twin = found.inodes().get((stat.st_dev, stat.st_ino))
            if twin is not None:
                raise WadiInputError(f"the {what} {path} is a hard link to the input {twin}; write it somewhere else.")
        if what in whole:
            if resolved == cwd or resolved in cwd.parents:
                raise WadiInputError(f"the {what} {path} is the current folder or holds it, and would be replaced "
                                     "whole; name a new folder.")
            if path.is_dir() and any(path.iterdir()) and not overwrite:
                raise WadiInputError(f"the {what} {path} already exists and is not empty; give --overwrite to "
                                     "replace it, or name a new folder.")
        if resolved in seen:
            raise WadiInputError(f"the {what} and the {seen[resolved]} would both be written to {path}.")
        seen[resolved] = what
        target = path if folder else path.parent
        reason = unwritable_reason(target)
        if reason is not None:
            raise WadiInputError(f"cannot write the {what} {path} ({reason}); choose another place.")
        if sizes and sizes.get(what):
            check_free_space(path, int(sizes[what]), what)
