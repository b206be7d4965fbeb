"""Lazy ``.safetensors`` reading (header first, one tensor at a time) and streaming writing.

The header is parsed and checked before anything else so that a text file, a truncated download or a corrupt
header is reported in one sentence instead of a library traceback. Tensors are read through
``safetensors.safe_open`` one at a time; writing streams one tensor at a time, so neither direction ever holds a
whole checkpoint in memory.

Every safetensors file the project writes goes through :func:`write_safetensors_streaming` (whole dicts through
:func:`write_safetensors`): its header lists the metadata in sorted key order. ``safetensors.torch.save_file``
orders the metadata by a hash map seeded anew in every process, so two identical runs would write different
bytes; here equal tensors and metadata always give equal files.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from wadi_probe.errors import WadiInputError

# safetensors dtype codes <-> torch dtypes
_CODE_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _CODE_TO_DTYPE[_code] = getattr(torch, _name)
_DTYPE_TO_CODE = {dtype: code for code, dtype in _CODE_TO_DTYPE.items()}

_MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and validate a safetensors header: ``({key: {"dtype", "shape", "data_offsets"}}, metadata, data_start)``.

    Raises :class:`WadiInputError` for files that are not safetensors, truncated files and corrupt headers.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise WadiInputError(f"{path} is not a safetensors file: it is only {size} bytes long.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise WadiInputError(
                    f"{path} is not a valid safetensors file (its header length is impossible; "
                    "is it a text file or a different format?)."
                )
            if header_len > size - 8:
                raise WadiInputError(
                    f"{path} is truncated or not a safetensors file: its header needs {header_len} bytes but the "
                    f"file has only {size - 8} after the length field."
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise WadiInputError(f"cannot read {path}: {exc.strerror or exc}.") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise WadiInputError(f"{path} is not a valid safetensors file (its header is not readable JSON).") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
            code, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise WadiInputError(f"{path} has a corrupt safetensors header (entry {key!r} is malformed).") from exc
        if code not in _CODE_TO_DTYPE:
            raise WadiInputError(f"{path} stores tensor {key!r} in dtype {code}, which this tool cannot read.")
        if end > data_len:
            raise WadiInputError(
                f"{path} is truncated or corrupt: tensor {key!r} ends at byte {end} but the file holds only "
                f"{data_len} data bytes (re-download or re-save it)."
            )
        numel = 1
        for dim in shape:
            numel *= int(dim)
        itemsize = torch.empty((), dtype=_CODE_TO_DTYPE[code]).element_size()
        if end - start != numel * itemsize:
            raise WadiInputError(f"{path} has a corrupt safetensors header (tensor {key!r} has the wrong byte size).")
    return header, dict(metadata), 8 + header_len


def utf8_path(path: str | Path) -> str:
    """``path`` as the text the safetensors library takes; a file name that is not valid UTF-8 (which that library
    cannot open) is refused with one sentence showing its undecodable bytes."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise WadiInputError(f"the path {shown} is not valid UTF-8, and the safetensors library opens only UTF-8 "
                             "paths; rename the file or folder whose name holds the undecodable bytes.") from None
    return text


class SafetensorsSource:
    """One ``.safetensors`` file opened lazily: shapes and dtypes from the header, tensors read on demand.

    The file is checked by ``safetensors.safe_open`` when opened, but tensors are then read with plain positioned
    reads into a fresh tensor rather than through the memory map: pages of a memory-mapped file stay resident
    once touched, so reading a 3.4 GB checkpoint through the map would grow the process by 3.4 GB, while a read
    holds only the one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        utf8_path(self.path)
        self.header, self.metadata, self._data_start = read_header(self.path)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise WadiInputError(f"{self.path} is not a readable safetensors file ({exc}).") from exc
        self._file: BinaryIO | None = open(self.path, "rb")
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        """Keys in file order (the header's data order)."""
        return sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _CODE_TO_DTYPE[self.header[key]["dtype"]]

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor's bytes into a new CPU tensor (little-endian, as safetensors stores them)."""
        if self._file is None:
            raise WadiInputError(f"{self.path} was closed before tensor {key!r} was read.")
        start, end = self.header[key]["data_offsets"]
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if end > start:
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with self._lock:
                self._file.seek(self._data_start + start)
                read = self._file.readinto(buffer)
            if read != end - start:
                raise WadiInputError(f"{self.path} is truncated: tensor {key!r} could not be read in full.")
        return out

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dimension 0) of one tensor, read alone: a fused tensor's part costs only its bytes."""
        if self._file is None:
            raise WadiInputError(f"{self.path} was closed before tensor {key!r} was read.")
        shape = self.shape(key)
        out = torch.empty((stop - start, *shape[1:]), dtype=self.dtype(key))
        if out.numel():
            row_bytes = out[0].numel() * out.element_size()
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with self._lock:
                self._file.seek(self._data_start + self.header[key]["data_offsets"][0] + start * row_bytes)
                read = self._file.readinto(buffer)
            if read != (stop - start) * row_bytes:
                raise WadiInputError(f"{self.path} is truncated: tensor {key!r} could not be read in full.")
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def write_safetensors_streaming(
    destination: BinaryIO,
    keys: Iterable[str],
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    fetch: Any,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by ``fetch(key)``.

    ``specs`` gives every key's (shape, dtype) up front so the header can be written first; each fetched tensor
    is checked against its spec and cast to the spec's dtype. Peak memory is one tensor.
    """
    keys = list(keys)
    header: dict[str, Any] = {}
    if metadata:  # sorted: the same metadata gives the same bytes in every process
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata, key=str)}
    offset = 0
    for key in keys:
        shape, dtype = specs[key]
        numel = 1
        for dim in shape:
            numel *= int(dim)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_TO_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    destination.write(struct.pack("<Q", len(raw)))
    destination.write(raw)
    for key in keys:
        shape, dtype = specs[key]
        tensor = fetch(key)
        if tuple(tensor.shape) != tuple(shape):
            raise WadiInputError(f"tensor {key!r} has shape {tuple(tensor.shape)} but {tuple(shape)} is required.")
        destination.write(_tensor_bytes(tensor.to(dtype)))


# safetensors' own data order: dtypes by this rank, highest first (wider types first keeps every tensor aligned),
# then by name; writing in the same order makes a file byte-identical to ``save_file``'s whenever the metadata
# holds at most one key.
_DTYPE_RANK = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
               "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to the safetensors file ``path`` (the project's ``save_file``), metadata in sorted order.

    Tensors are laid out as ``safetensors.torch.save_file`` lays them out and read back by any safetensors reader;
    peak memory beyond ``tensors`` is one tensor's bytes. Not atomic by itself: callers write into
    :func:`~wadi_probe.io.atomic.atomic_path`.
    """
    path = Path(path)
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise WadiInputError(f"{path}: safetensors stores str -> tensor, not {type(key).__name__} -> "
                                 f"{type(tensor).__name__}.")
        if tensor.dtype not in _DTYPE_TO_CODE:
            raise WadiInputError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store.")
    rank = {code: i for i, code in enumerate(_DTYPE_RANK)}
    keys = sorted(tensors, key=lambda k: (-rank.get(_DTYPE_TO_CODE[tensors[k].dtype], -1), k))
    specs = {k: (tuple(tensors[k].shape), tensors[k].dtype) for k in keys}
    with open(path, "wb") as handle:
        write_safetensors_streaming(handle, keys, specs, tensors.__getitem__, metadata)
    return path
