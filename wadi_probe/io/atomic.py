"""Write files so that a crash or a bad input never leaves a half-written result behind.

Everything the project writes goes to a temporary name in the destination folder first and is renamed into
place only when complete (``os.replace`` is atomic on one filesystem). ``tempfile.mkstemp``/``mkdtemp`` create
their entries private (0600/0700) whatever the umask, and so do some writers (safetensors); the finished entry,
and everything inside a finished folder, is given the mode the umask gives a plain ``open``/``mkdir``
(0644/0755 under umask 022) before it is renamed, so colleagues on a shared machine can read checkpoints,
students and reports as they can any other file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from wadi_probe.errors import WadiInputError


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, directory: bool) -> None:
    """Give a fresh temporary entry the permissions ``open``/``mkdir`` would have given it."""
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~current_umask())


def _apply_umask_tree(path: Path) -> None:
    """Apply the umask to ``path`` and everything written inside it: some writers (safetensors' ``save_file``)
    create their files private (0600) themselves, whatever the umask."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                _apply_umask(Path(root) / name, True)
            for name in files:
                _apply_umask(Path(root) / name, False)
        _apply_umask(path, True)
    elif path.exists():
        _apply_umask(path, False)


def unwritable_reason(folder: str | os.PathLike[str]) -> str | None:
    """Why nothing could be written at or below ``folder`` (checked at the nearest existing folder), or None.

    A real file creation, not ``os.access``: root, read-only mounts, ``/proc`` and ACLs all answer truthfully so.
    Commands call it before any computation, so that an output that cannot be written is refused up front.
    """
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"{probe}: {exc.strerror or exc}"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure remove it.

    With ``directory=True`` the temporary path is a fresh folder and replaces any folder at ``path``. A
    destination that cannot be written (read-only, a file where a folder should be, no such place) is refused
    with :class:`~wadi_probe.errors.WadiInputError` before anything is written.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:  # the destination itself is wrong: one sentence for every writer of the project
        blocker = next((p for p in final.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise WadiInputError(f"Cannot write {final}: {blocker} is a file, not a folder.") from exc
        raise WadiInputError(f"Cannot write {final}: {exc.strerror or exc} ({exc.filename or final.parent}).") from exc
    _apply_umask(tmp, directory)
    try:
        yield tmp
        _apply_umask_tree(tmp)
        if directory:
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (NaN is refused: reports use null for missing values)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
