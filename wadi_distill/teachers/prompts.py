"""Reading training prompts from ``.txt`` (one per line), ``.jsonl`` or ``.csv`` files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from wadi_probe.errors import WadiInputError
from wadi_probe.text import plural, quoted

PROMPT_FIELDS = ("prompt", "text", "caption")


def _pick_field(record: dict, column: str | None, where: str) -> str:
    if column is not None:
        if column not in record:
            names = [quoted(str(name), 40) for name in list(record)[:10]]
            more = f" and {plural(len(record) - 10, 'other')}" if len(record) > 10 else ""
            raise WadiInputError(f"{where} has no column {quoted(column, 40)} (it has: {', '.join(names)}{more}).")
        return str(record[column])
    for field in PROMPT_FIELDS:
        if field in record:
            return str(record[field])
    raise WadiInputError(
        f"{where} has none of the columns {', '.join(PROMPT_FIELDS)}; name the prompt column with --prompt-column."
    )


def load_prompts(path: str | Path, *, column: str | None = None) -> list[str]:
    """Read prompts from a text (one per line), JSON-lines or CSV file; blank prompts are skipped.

    ``column`` names the field holding the prompt in ``.jsonl``/``.csv`` files (default: the first of
    ``prompt``, ``text``, ``caption`` that exists). An empty result is an input error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WadiInputError(f"The prompt file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WadiInputError(f"The prompt file {path} is not UTF-8 text.") from exc
    prompts: list[str] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WadiInputError(f"Line {number} of {path} is not valid JSON.") from exc
            if isinstance(record, str):
                prompts.append(record)
            elif isinstance(record, dict):
                prompts.append(_pick_field(record, column, f"Line {number} of {path}"))
            else:
                raise WadiInputError(f"Line {number} of {path} is neither a string nor an object.")
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise WadiInputError(f"The prompt file {path} is empty.")
        for number, row in enumerate(reader, start=2):
            prompts.append(_pick_field(row, column, f"Row {number} of {path}"))
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise WadiInputError(f"The prompt file {path} contains no prompts.")
    return prompts
