"""Read a JSON file the project or a user wrote, with the project's one-sentence error for a malformed one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wadi_probe.errors import WadiInputError


def read_json(path: str | Path) -> Any:
    """Parse the JSON file at ``path``; text that is not JSON (or not UTF-8) raises :class:`WadiInputError`.

    Whether the file exists is the caller's question: each caller knows what a missing file means for it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WadiInputError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc}).") from None
