"""Prose for messages and titles: counted nouns and user input quoted at a bounded length."""

from __future__ import annotations

__all__ = ["plural", "quoted"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 student``, ``2 students`` (``nouns`` for an irregular plural)."""
    return f"{count:,} {noun if count == 1 else (nouns or noun + 's')}"


def quoted(text: str, limit: int = 80) -> str:
    """``text`` in quotes as ``repr`` writes it, cut to its first ``limit`` characters with the full length said when
    longer, so that a refusal repeating a user's input stays one readable line."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"
