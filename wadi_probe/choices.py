"""The base of every fixed set of choices a user names by its value (``--device cuda``, ``"mixed_precision": "bf16"``).

A :class:`Choice` is a ``str`` enum whose ``str()`` is its value, as ``enum.StrEnum`` does from Python 3.11 (it is
written here because the project also runs on 3.10). That matters beyond printing: typer before 0.29 hands the
member a command-line parser returned back through ``str()`` to find it again among the values, and with
``str(Device.cuda) == "Device.cuda"`` finds nothing and passes ``None`` to the command.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A named choice that compares, hashes, serialises and prints as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
