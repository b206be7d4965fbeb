"""The one exception type that means "the input is wrong", shared by both packages.

Library functions raise :class:`WadiInputError` with one plain sentence; the command-line tools turn it into
that sentence on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class WadiInputError(ValueError):
    """A usage or input error a person can fix: a missing file, a corrupt checkpoint, a mismatched model."""


class WadiRuntimeError(RuntimeError):
    """A run that cannot go on (for example NaN losses); reported in one sentence with a non-zero exit code."""
