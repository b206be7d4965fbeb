"""Write files so that a crash or a bad input never leaves a half-written result behind.

Everything the project writes goes to a temporary name in the destination folder first and is renamed into
place only when complete (``os.replace`` is atomic on one filesystem). ``tempfile.mkstemp``/``mkdtemp`` create
their entries private (0600/0700) whatever the umask, and so do some writers (safetensors); the finished entry,
and everything inside a finished folder, is given the mode the umask gives a plain ``open``/``mkdir``
(0644/0755 under umask 022) before it is renamed, so colleagues on a shared machine can read checkpoints,
students and reports as they can any other file.

A write that fails for a reason outside the program (a full disk, ``ulimit -f``, a read-only mount, no
permission) becomes one :class:`~wadi_probe.errors.WadiWriteError` naming the destination and the reason
(:func:`write_failure`), whichever writer failed (Python's ``open``, safetensors' Rust writer, ``torch.save``,
PIL); the temporary entry is removed, so the destination keeps what it held before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from wadi_probe.errors import WRITE_ERRORS, WadiInputError, WadiRuntimeError, WadiWriteError

#: errnos that only a write can cause (EACCES/EPERM may also come from reading an input)
_WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
#: free space below which a writer's failure without an errno (torch.save's RuntimeError) is put down to a full disk
_NEARLY_FULL = 1 << 20


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
        return f"{probe}: {WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))}"
    return None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, its cause or context, or the "(os error N)" a Rust writer reports."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = re.search(r"os error (\d+)", str(current))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def _sizes(tmp: Path) -> dict[Path, int]:
    if tmp.is_dir():
        return {p: p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
    return {tmp: tmp.stat().st_size} if tmp.exists() else {}


def write_failure(exc: BaseException, final: Path, tmp: Path | None = None) -> WadiWriteError | None:
    """The one-sentence error for a write to ``final`` that raised ``exc``, or None when ``exc`` is no write failure.

    ``tmp`` is the temporary entry being written (still present): a writer that reports no errno (``torch.save``
    says only "unexpected pos") is judged by the place itself, a file that reached the ``ulimit -f`` size or a
    disk with (almost) no space left.
    """
    if isinstance(exc, WadiWriteError):
        return exc
    if not isinstance(exc, Exception) or isinstance(exc, (WadiInputError, WadiRuntimeError)):
        return None  # an interrupt, or the project's own sentence (a wrong shape aborting a write): kept as it is
    os_error = _os_error_in(exc)
    if os_error is not None and os_error.errno in WRITE_ERRORS:
        where = Path(os_error.filename) if getattr(os_error, "filename", None) else None
        if os_error.errno not in _WRITE_ONLY and where is not None and tmp is not None and where != tmp \
                and tmp not in where.parents:
            return None  # permission denied on something else (an input being read): not this write's failure
        return WadiWriteError(_named(final, tmp, where), WRITE_ERRORS[os_error.errno])
    if tmp is None or not tmp.exists():
        return None
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    too_big = [path for path, size in _sizes(tmp).items() if limit != resource.RLIM_INFINITY and size >= limit]
    if too_big:
        return WadiWriteError(_named(final, tmp, too_big[0]), WRITE_ERRORS[errno.EFBIG])
    if shutil.disk_usage(tmp if tmp.is_dir() else tmp.parent).free < _NEARLY_FULL:
        return WadiWriteError(final, WRITE_ERRORS[errno.ENOSPC])
    return None


def _named(final: Path, tmp: Path | None, where: Path | None) -> Path:
    """The destination a failed write is told by: ``final``, or the file inside it when a folder was being written."""
    if where is not None and tmp is not None and tmp in where.parents:
        return final / where.relative_to(tmp)
    return final


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure remove it.

    With ``directory=True`` the temporary path is a fresh folder and replaces any folder at ``path``. A
    destination that cannot be written (read-only, a file where a folder should be, no such place) is refused
    with :class:`~wadi_probe.errors.WadiInputError` before anything is written; a write that fails on the way (no
    space, a file-size limit) raises :class:`~wadi_probe.errors.WadiWriteError` naming ``path`` and the reason,
    with the temporary entry (and any folder made for it) removed and ``path`` as it was.
    """
    final = Path(path)
    created = [p for p in final.parents if not p.exists()]  # removed again if the write fails (nothing is left)
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
        reason = WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
        raise WadiInputError(f"Cannot write {final}: {reason} ({exc.filename or final.parent}).") from exc
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
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)  # the old folder goes back: a failed replacement loses nothing
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        failure = write_failure(exc, final, tmp)
        if isinstance(failure, WadiWriteError) and failure is exc and isinstance(exc.path, Path) \
                and tmp in exc.path.parents:  # a write nested in this folder: name it inside the destination
            failure = WadiWriteError(final / exc.path.relative_to(tmp), exc.reason)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        for folder in created:  # deepest first; a folder another write filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        if failure is not None and failure is not exc:
            raise failure from exc
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (NaN is refused: reports use null for missing values)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
