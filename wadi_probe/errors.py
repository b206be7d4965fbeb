"""The one exception type that means "the input is wrong", shared by both packages.

Library functions raise :class:`WadiInputError` with one plain sentence; the command-line tools turn it into
that sentence on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import errno

#: errno -> the reason told to the user; these mean the place, not the program or its input, is at fault
WRITE_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class WadiInputError(ValueError):
    """A usage or input error a person can fix: a missing file, a corrupt checkpoint, a mismatched model."""


class WadiRuntimeError(RuntimeError):
    """A run that cannot go on (for example NaN losses); reported in one sentence with a non-zero exit code."""


class WadiWriteError(WadiInputError):
    """A write that failed for a reason outside the program (no space, a file-size limit, no permission, a
    read-only disk): one sentence naming the file and the reason, exit code 2; nothing is left half-written."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"Could not write {path}: {reason}; nothing was left half-written.")
