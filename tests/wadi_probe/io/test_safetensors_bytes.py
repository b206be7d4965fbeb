"""Safetensors files the project writes are byte-reproducible: metadata in sorted order, safetensors' own layout."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wadi_probe.errors import WadiInputError
from wadi_probe.io.formats.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parents[3]
METADATA = {"format": "pt", "kind": "lorad", "zeta": "1", "alpha": "2", "base": "x", "rank": "4", "note": "n"}

WRITE = """
import sys, torch
from wadi_probe.io.formats.safetensors_io import write_safetensors
g = torch.Generator().manual_seed(0)
tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(4, generator=g).half(),
           "c": torch.arange(6)}
write_safetensors(tensors, sys.argv[1], metadata=dict(zeta="1", alpha="2", format="pt", kind="lorad", base="x",
                                                      rank="4", note="n"))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n])


def test_two_processes_with_other_hash_seeds_write_identical_bytes(tmp_path):
    digests = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"w{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", WRITE, str(out)], check=True, env=env, cwd=tmp_path)
        digests.append(_sha(out))
    assert len(set(digests)) == 1
    assert list(_header(tmp_path / "w1.safetensors")["__metadata__"]) == sorted(METADATA)


def test_layout_equals_safetensors_own_writer_and_reads_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"b": torch.randn(3, 5, generator=g).half(), "a": torch.randint(0, 9, (7,), generator=g).to(torch.int8),
               "c": torch.randn(1, generator=g).double(), "d": torch.randn(2, 3, generator=g)[:, 1],
               "e": torch.ones(2, dtype=torch.bool), "f": torch.randn(2, generator=g).bfloat16(),
               "g": torch.arange(4), "h": torch.zeros(0, 3)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    for metadata in (None, {"format": "pt"}):  # at most one key: safetensors' bytes are reproducible too
        write_safetensors(tensors, ours, metadata=metadata)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes()
    write_safetensors(tensors, ours, metadata=METADATA)
    back = load_file(str(ours))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    with safe_open(str(ours), "pt") as handle:
        assert handle.metadata() == METADATA


def test_refuses_what_safetensors_cannot_store(tmp_path):
    with pytest.raises(WadiInputError, match="str -> tensor"):
        write_safetensors({"a": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(WadiInputError, match="cannot store"):
        write_safetensors({"a": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
