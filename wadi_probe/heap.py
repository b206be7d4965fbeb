"""Keep freed memory in the process while a probe streams tensors, so each new tensor does not page-fault.

A probe allocates, per layer, a few arrays the size of the weight (the two read buffers, unit rows, the
residual, the pair products) and frees them before the next layer. glibc serves blocks above its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and returns them with ``munmap``, so every such array of every layer is
first touched page by page: on a 2-core machine that was 20 s of kernel time out of a 57 s SD1.5 probe.
:func:`reuse_freed_memory` makes glibc serve blocks from its heap and keep freed blocks for reuse, then restores
glibc's default limits and hands the kept memory back to the system when the block ends. Peak resident memory
is unchanged (it is the largest layer's working set either way).

On anything other than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import contextlib
import platform
import threading
from collections.abc import Iterator

__all__ = ["reuse_freed_memory"]

# mallopt parameters and glibc's defaults (malloc/malloc.c).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_KEEP_UP_TO = 2**31 - 1  # trim threshold while active (mallopt takes an int): keep the heap's top mid-run

_lock = threading.Lock()
_depth = 0


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


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, large blocks come from glibc's heap and freed ones are reused (nested blocks are fine)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _mallopt(_M_MMAP_MAX, 0)
            _mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                if _LIBC is not None:
                    _LIBC.malloc_trim(0)
