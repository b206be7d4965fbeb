"""Keep freed memory in the process while a probe streams tensors, so each new tensor does not page-fault.

A probe allocates, per layer, a few arrays the size of the weight (the two read buffers, unit rows, the
residual, the pair products) and frees them before the next layer. glibc serves blocks above its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and returns them with ``munmap``, so every such array of every layer is
first touched page by page: on a 2-core machine that was 20 s of kernel time out of a 57 s SD1.5 probe.
:func:`reuse_freed_memory` makes glibc serve blocks from its heap and keep freed blocks for reuse, then puts
back the limits that were in force before and hands the kept memory back to the system when the block ends.
The price is memory: glibc does not always serve a new array from a freed block, and kept blocks stay resident
beside fresh ones, so the peak can grow by about one more working set of the largest layer (measured up to 77 MB on
a quarter-width SD1.5 pair, 250–290 MB on stacks whose largest tensor is 118 MB; ``benchmarks/RESULTS.md``), not
with the number of layers.

It changes a setting of the whole process, so the library never applies it on its own: the ``wadi-probe``
command wraps its work in it, and a script that wants the same speed opts in the same way (as
``benchmarks/probe_sd15.py`` does). glibc has no call that reads these limits back, so "what was there" is
what this module last set, else what the process started with: glibc's defaults unless the environment set
them (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``).

On anything other than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import contextlib
import os
import platform
import threading
from collections.abc import Iterator, Mapping

__all__ = ["reuse_freed_memory", "current_limits"]

# mallopt parameters and glibc's defaults (malloc/malloc.c).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_KEEP_UP_TO = 2**31 - 1  # trim threshold while active (mallopt takes an int): keep the heap's top mid-run

_lock = threading.Lock()
_depth = 0
_saved: dict[int, int] = {}


def _startup_limits(environ: Mapping[str, str]) -> dict[int, int]:
    """The limits the process started with: glibc's defaults, or what the environment asked glibc for."""
    limits = {_M_MMAP_MAX: _DEFAULT_MMAP_MAX, _M_TRIM_THRESHOLD: _DEFAULT_TRIM_THRESHOLD}
    names = {_M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
             _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")}
    tunables = dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    for option, (variable, tunable) in names.items():
        for text in (tunables.get(tunable), environ.get(variable)):  # the old variables win, as in glibc
            if text is not None and text.strip().isdigit():
                limits[option] = int(text)
    return limits


_current = _startup_limits(os.environ)


def current_limits() -> dict[str, int]:
    """The mmap count limit and trim threshold in force, as far as this process knows (see the module doc)."""
    return {"mmap_max": _current[_M_MMAP_MAX], "trim_threshold": _current[_M_TRIM_THRESHOLD]}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def _mallopt(option: int, value: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(option, value)
    _current[option] = value


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, large blocks come from glibc's heap and freed ones are reused (nested blocks are fine)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _saved.clear()
            _saved.update(_current)
            _mallopt(_M_MMAP_MAX, 0)
            _mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _mallopt(_M_MMAP_MAX, _saved[_M_MMAP_MAX])
                _mallopt(_M_TRIM_THRESHOLD, _saved[_M_TRIM_THRESHOLD])
                if _LIBC is not None:
                    _LIBC.malloc_trim(0)
