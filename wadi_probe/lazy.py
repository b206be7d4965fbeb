"""Lazy package exports (PEP 562): ``from package import name`` imports the defining module on first use.

Both packages export their main functions at the top level, but the command lines must start fast: importing
``wadi_distill`` must not import torch, diffusers or every submodule just to print ``--help``. A package calls
:func:`lazy_exports` with {name: defining module} and gets the ``__getattr__`` and ``__dir__`` it needs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``exports`` map a public name to its module path."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
