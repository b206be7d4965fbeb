"""Checkpoint folders of a VSD run: ``OUT/checkpoint-STEP/``, written atomically, read back with every file checked.

A checkpoint holds the student's and the fake score's trainable tensors (safetensors), both optimizers and
schedulers, the EMA (``ema.pt``, diffusers' ``EMAModel`` state), the gradient scaler of fp16 runs
(``scaler.pt``), the RNG states (``rng.safetensors``), the plan, and ``state.json`` (step, run id, the parts of
the run's identity and the training options). A missing or unreadable file is refused with one sentence.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path
from wadi_probe.io.formats.safetensors_io import write_safetensors
from wadi_probe.io.jsonfile import read_json

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_RE = re.compile(r"^\.(checkpoint-\d+|final)\..*\.tmp$")
FORMAT = 2
REQUIRED = ("student.safetensors", "fake.safetensors", "optimizer_student.pt", "optimizer_fake.pt",
            "schedulers.pt", "rng.safetensors")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint-STEP`` folder in ``output_dir``, oldest first."""
    root = Path(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def remove_partial_writes(output_dir: Path) -> None:
    """Delete temporary folders a killed run left while writing a checkpoint or final/ (never complete ones)."""
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            if child.is_dir() and PARTIAL_RE.match(child.name):
                shutil.rmtree(child, ignore_errors=True)


def prune(output_dir: Path, limit: int | None) -> None:
    """Keep only the newest ``limit`` checkpoints."""
    if limit is None:
        return
    existing = list_checkpoints(output_dir)
    for _, old in existing[: max(0, len(existing) - limit)]:
        shutil.rmtree(old)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (None when the folder holds none yet) or a folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_file():
        raise WadiInputError(f"{path} is a file; --resume takes a checkpoint folder (checkpoint-STEP) or latest.")
    if not path.is_dir():
        raise WadiInputError(f"The checkpoint folder {path} does not exist.")
    if not (path / "state.json").is_file():
        raise WadiInputError(f"{path} is not a wadi-distill checkpoint folder (no state.json).")
    return path


def tensors_state(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """CPU copies of ``named`` parameters, by name."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def write_checkpoint(path: Path, files: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``path`` atomically: ``files`` maps a file name to tensors (``.safetensors``) or an object (``.pt``)."""
    with atomic_path(path, directory=True) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                write_safetensors(content, tmp / name)
            elif name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
            else:
                torch.save(content, tmp / name)
        (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT}, indent=1) + "\n")
    return path


class CheckpointReader:
    """Read the files of one checkpoint folder, each refused with one sentence when missing or unreadable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = read_json(path / "state.json")
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        if missing:
            raise WadiInputError(f"The checkpoint {path} is incomplete: {', '.join(missing)} missing; resume from "
                                 "an earlier checkpoint (--resume PATH).")

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / name))
        except Exception as exc:  # truncated or corrupt: the cause is chained
            raise WadiInputError(f"{self.path / name} is unreadable (truncated or corrupt); resume from an "
                                 "earlier checkpoint (--resume PATH).") from exc

    def obj(self, name: str) -> Any:
        try:
            return torch.load(self.path / name, weights_only=True)
        except Exception as exc:
            raise WadiInputError(f"{self.path / name} is unreadable (truncated or corrupt); resume from an "
                                 "earlier checkpoint (--resume PATH).") from exc


def load_into(named: list[tuple[str, torch.nn.Parameter]], tensors: dict[str, torch.Tensor], what: str,
              where: Path) -> None:
    """Copy checkpoint ``tensors`` into the parameters ``named``, refusing other names or shapes."""
    names = {n for n, _ in named}
    if set(tensors) != names:
        raise WadiInputError(f"The {what} in {where} does not match this run's layers; it was written by another run.")
    with torch.no_grad():
        for n, p in named:
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise WadiInputError(f"The {what} in {where} has other shapes than this run; it was written by "
                                     "another run.")
            p.copy_(tensors[n].to(p.device, p.dtype))
