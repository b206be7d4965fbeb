"""An on-disk cache of text-encoder outputs: the encoders run once over all prompts, then are freed.

Layout of a cache folder: ``index.json`` (key, count, chunk size, field names), ``null.safetensors`` (the null
prompt's conditioning) and ``chunk-NNNNN.safetensors`` files of up to ``chunk_size`` prompts each. Rows are read
lazily (memory-mapped slices), so a cache of millions of prompts never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from wadi_distill.teachers.pipeline import Conditioning
from wadi_probe.io.atomic import atomic_path
from wadi_probe.io.formats.safetensors_io import write_safetensors
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json
from wadi_probe.text import plural

CACHE_VERSION = 1


def cache_key(prompts: list[str], teacher_fingerprint: str, null_prompt: str = "") -> str:
    """A hash of the prompts, the null prompt and the teacher: a cache built for other inputs is never reused."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{teacher_fingerprint}|{null_prompt}\n".encode())
    for prompt in prompts:
        digest.update(prompt.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:24]


class EmbeddingCache:
    """Read access to a written cache: ``get(indices)`` returns a batched :class:`Conditioning` (fp32, CPU)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise WadiInputError(f"{self.folder} is not an embedding cache (no index.json).")
        self.index = read_json(index_path)
        self.count = int(self.index["count"])
        self.chunk_size = int(self.index["chunk_size"])
        self.fields = list(self.index["fields"])
        self._handles: dict[int, object] = {}
        with safe_open(self.folder / "null.safetensors", framework="pt") as handle:
            self.null = Conditioning.from_tensors({k: handle.get_tensor(k) for k in handle.keys()})

    @property
    def key(self) -> str:
        return str(self.index["key"])

    def __len__(self) -> int:
        return self.count

    def _handle(self, chunk: int):
        if chunk not in self._handles:
            self._handles[chunk] = safe_open(self.folder / f"chunk-{chunk:05d}.safetensors", framework="pt")
        return self._handles[chunk]

    def get(self, indices: torch.Tensor | list[int]) -> Conditioning:
        """The conditioning of the prompts at ``indices`` (in that order)."""
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.fields}
        for idx in [int(i) for i in indices]:
            if not 0 <= idx < self.count:
                raise IndexError(f"prompt index {idx} outside the cache of {self.count} prompts")
            handle = self._handle(idx // self.chunk_size)
            row = idx % self.chunk_size
            for k in self.fields:
                rows[k].append(handle.get_slice(k)[row : row + 1])
        return Conditioning.from_tensors({k: torch.cat(v) for k, v in rows.items()})


def build_embedding_cache(
    folder: str | Path,
    prompts: list[str],
    encode: Callable[[list[str]], Conditioning],
    *,
    key: str,
    null_prompt: str = "",
    batch_size: int = 64,
    chunk_size: int = 4096,
    progress: Callable[[int], None] | None = None,
    notes: Callable[[str], None] | None = None,
) -> EmbeddingCache:
    """Encode ``prompts`` (and the null prompt) once into ``folder``; reuse the folder when its key matches.

    The folder is written under a temporary name and renamed into place when complete, so an interrupted run
    never leaves a half-written cache that would later be trusted. ``notes`` receives one line per written
    chunk (prompts done, prompts per second), for the logs of long encodings.
    """
    folder = Path(folder)
    if (folder / "index.json").is_file():
        existing = read_json(folder / "index.json")
        if existing.get("key") == key and existing.get("version") == CACHE_VERSION:
            return EmbeddingCache(folder)
    if not prompts:
        raise WadiInputError("There are no prompts to encode.")
    started = time.perf_counter()
    if notes is not None:
        notes(f"encoding {plural(len(prompts), 'prompt')} into {folder}")
    with atomic_path(folder, directory=True) as tmp:
        null = encode([null_prompt])
        write_safetensors(null.tensors(), tmp / "null.safetensors")
        fields_ = list(null.tensors())
        for chunk_index, start in enumerate(range(0, len(prompts), chunk_size)):
            chunk_prompts = prompts[start : start + chunk_size]
            parts: list[Conditioning] = []
            for b in range(0, len(chunk_prompts), batch_size):
                parts.append(encode(chunk_prompts[b : b + batch_size]))
                if progress is not None:
                    progress(len(chunk_prompts[b : b + batch_size]))
            chunk = Conditioning.cat(parts)
            write_safetensors(chunk.tensors(), tmp / f"chunk-{chunk_index:05d}.safetensors")
            if notes is not None:
                done, elapsed = start + len(chunk_prompts), time.perf_counter() - started
                notes(f"encoded {done}/{len(prompts)} prompts ({done / max(elapsed, 1e-9):.1f} prompts/s)")
        index = {"version": CACHE_VERSION, "key": key, "count": len(prompts), "chunk_size": chunk_size,
                 "fields": fields_}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return EmbeddingCache(folder)


def wait_for_cache(folder: str | Path, key: str, *, poll_seconds: float = 1.0) -> EmbeddingCache:
    """Wait (without a time limit) until another process has written the cache ``key`` into ``folder``.

    The processes of a multi-process run that do not encode poll the file system instead of waiting at a
    process-group barrier, whose timeout (minutes) a long prompt set would outlast. If the encoding process
    fails, the launcher (torchrun, ``accelerate launch``) ends the others.
    """
    folder = Path(folder)
    index = folder / "index.json"
    while True:
        if index.is_file():
            try:  # not read_json: a file being replaced right now is looked at again, not an error
                found = json.loads(index.read_text())
            except (OSError, json.JSONDecodeError):
                found = {}
            if found.get("key") == key and found.get("version") == CACHE_VERSION:
                return EmbeddingCache(folder)
        time.sleep(poll_seconds)
