"""Torch ``.bin``/``.pt``/``.ckpt`` files, loaded only with ``weights_only=True`` (never unpickling code).

Files saved with the zip serialisation are memory-mapped, so a tensor's bytes are paged in only when it is
read. State dicts nested under ``state_dict``/``model``/``module``/``ema`` keys are found and unwrapped.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wadi_probe.errors import WadiInputError

_NESTING_KEYS = ("state_dict", "model", "module", "model_state_dict", "unet", "ema", "params")


def load_weights_only(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped where the file allows); clear errors otherwise."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            with warnings.catch_warnings():  # old pickle protocols warn before failing or loading
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc) and "global" not in str(exc):
            raise WadiInputError(
                f"{path} is not a readable torch checkpoint (it is not a torch.save file of plain tensors)."
            ) from exc
        raise WadiInputError(
            f"{path} refuses to load safely: it is a pickle that needs code to run (only plain tensors are "
            "accepted, torch.load weights_only=True); convert it to .safetensors with a trusted tool."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, ImportError) as exc:
        raise WadiInputError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}).") from exc


def find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Return the tensor dict inside a loaded object and the nesting keys that led to it."""
    nesting: tuple[str, ...] = ()
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) // 2:
            return tensors, nesting
        inner = next((k for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
        nesting += (inner,)
    raise WadiInputError(f"{path} holds no state dict of tensors (looked under {', '.join(_NESTING_KEYS)}).")


class DictSource:
    """A tensor source over a state dict already in memory (a module's, or one handed over by a notebook)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str | Path = "<memory>") -> None:
        self.path = Path(path)
        self._tensors = {key: value.detach() for key, value in tensors.items() if isinstance(value, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        pass


class TorchSource(DictSource):
    """A torch checkpoint's state dict (memory-mapped when possible), read tensor by tensor."""

    def __init__(self, path: Path) -> None:
        tensors, self.nesting = find_state_dict(load_weights_only(Path(path)), Path(path))
        super().__init__(tensors, path)

    def tensor(self, key: str) -> torch.Tensor:
        # A copy, so that a caller working in place never writes through to the memory-mapped file.
        return self._tensors[key].clone()

    def close(self) -> None:
        self._tensors = {}
