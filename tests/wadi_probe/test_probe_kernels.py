"""The fast paths behind the probe: lower-triangle Gram, eigenvalues, complex column pairs, the closed-form
explained fraction, and the heap setting that keeps freed memory for reuse."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from wadi_probe.decompose import (
    AnalysisSettings,
    _explained,
    _explained_by_exact_angles,
    analyze_pair,
    gram_singular_values_sq,
    lower_gram,
    symmetric_eigenvalues,
)
from wadi_probe.heap import reuse_freed_memory
from wadi_probe.rotation import column_pairs, pair_angles, rotate_pairs


@pytest.mark.parametrize("shape", [(700, 2000), (2000, 700), (200, 200), (5, 40)])
def test_lower_gram_matches_the_full_product_on_and_below_the_diagonal(shape):
    m = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = m @ m.mT if shape[0] <= shape[1] else m.mT @ m
    got = lower_gram(m)
    assert got.shape == full.shape
    torch.testing.assert_close(torch.tril(got), torch.tril(full), rtol=1e-12, atol=1e-9)


def test_symmetric_eigenvalues_read_only_the_lower_triangle():
    m = torch.randn(300, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = m @ m.mT
    expected = torch.linalg.eigvalsh(gram)
    garbage_above = gram.clone()
    garbage_above[torch.triu(torch.ones_like(gram, dtype=torch.bool), diagonal=1)] = float("nan")
    torch.testing.assert_close(symmetric_eigenvalues(garbage_above), expected, rtol=1e-10, atol=1e-8)


def test_blocked_gram_spectrum_matches_svdvals_for_a_layer_sized_matrix():
    m = torch.randn(640, 1500, generator=torch.Generator().manual_seed(2))
    sigma_sq = gram_singular_values_sq(m)
    reference = torch.linalg.svdvals(m.double()).square()
    torch.testing.assert_close(sigma_sq, reference, rtol=0, atol=1e-5 * float(reference[0]))


def test_column_pairs_are_a_view_when_possible_and_a_copy_for_odd_fan_in():
    even = torch.arange(12.0).reshape(2, 6)
    pairs = column_pairs(even)
    assert pairs.shape == (2, 3) and pairs.untyped_storage().data_ptr() == even.untyped_storage().data_ptr()
    assert pairs[1, 2] == complex(10.0, 11.0)
    odd = torch.arange(14.0).reshape(2, 7)
    odd_pairs = column_pairs(odd)
    assert odd_pairs.shape == (2, 3) and odd_pairs[1, 0] == complex(7.0, 8.0) and odd_pairs[1, 2] == complex(11.0, 12.0)
    assert column_pairs(even.half()).dtype == torch.complex64


def test_pair_angles_are_zero_for_signed_zero_pairs():
    # conj(t)·s for t = (−0, 0) and s = (−1, 0) is (+0·…) with a negative-zero real part: atan2 would say π.
    t = torch.tensor([[-0.0, 0.0, 1.0, 0.0]])
    s = torch.tensor([[-1.0, 0.0, -0.0, -0.0]])
    assert torch.equal(pair_angles(t, s).abs(), torch.zeros(1, 2))


@pytest.mark.parametrize("fan_in", [16, 17])
def test_explained_without_rotating_equals_rotating_by_the_exact_angles(fan_in):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(9, fan_in, dtype=torch.float64, generator=g)
    s = t + 0.2 * torch.randn(9, fan_in, dtype=torch.float64, generator=g)
    t[0, :2] = 0.0  # a zero teacher pair
    s[1, 2:4] = 0.0  # a zero student pair
    t_inv = 1 / t.norm(dim=1, keepdim=True)
    s_inv = 1 / s.norm(dim=1, keepdim=True)
    residual_energy = float((s * s_inv - t * t_inv).square().sum())
    theta = pair_angles(t, s)
    explicit = _explained(t * t_inv, s * s_inv, theta, residual_energy)
    closed = _explained_by_exact_angles(column_pairs(t), column_pairs(s), t, s, t_inv, s_inv, residual_energy)
    assert 0.0 < explicit < 1.0
    assert closed == pytest.approx(explicit, abs=1e-12)


def test_explained_of_a_pure_rotation_plus_rescale_is_one_in_fp32():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(64, 300, generator=g)
    theta = 1e-3 * torch.randn(64, 150, generator=g)  # small angles: the case where cancellation would show
    s = rotate_pairs(t.double(), theta.double()).float() * 1.01
    record = analyze_pair(t, s, AnalysisSettings())
    assert record["lorad_explained"] == pytest.approx(1.0, abs=1e-4)


def _glibc() -> bool:
    if platform.system() != "Linux":
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


# Run in a fresh interpreter: the resident size it reads depends on what earlier tests left in this process's heap
# (free blocks already resident make a new 200 MB tensor grow the resident size by less than 200 MB).
_REUSE_SCRIPT = """
import json, torch
from wadi_probe.heap import reuse_freed_memory

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

before = rss()
with reuse_freed_memory():
    with reuse_freed_memory():  # nesting is allowed
        block = torch.ones(50_000_000)  # 200 MB, far above glibc's mmap threshold
        del block
    kept = rss()
    again = torch.ones(50_000_000)
    del again
after = rss()
print(json.dumps({"kept": kept - before, "after": after - before}))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc-only setting")
def test_reuse_freed_memory_keeps_blocks_inside_and_returns_them_after():
    done = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    assert grown["kept"] > 190e6  # freed inside the block, still resident (ready for reuse)
    assert grown["after"] < 10e6  # given back when the block ends


def test_allocator_limits_come_back_as_they_were_and_startup_values_follow_the_environment():
    from wadi_probe import heap

    assert heap._startup_limits({}) == {heap._M_MMAP_MAX: 65536, heap._M_TRIM_THRESHOLD: 128 * 1024}
    env = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000:glibc.malloc.mmap_max=7", "MALLOC_MMAP_MAX_": "9"}
    assert heap._startup_limits(env) == {heap._M_MMAP_MAX: 9, heap._M_TRIM_THRESHOLD: 1_000_000}
    before = heap.current_limits()
    heap._mallopt(heap._M_TRIM_THRESHOLD, 4 * 1024 * 1024)  # someone set their own limit earlier
    try:
        with reuse_freed_memory():
            assert heap.current_limits() == {"mmap_max": 0, "trim_threshold": 2**31 - 1}
        assert heap.current_limits() == {**before, "trim_threshold": 4 * 1024 * 1024}
    finally:
        heap._mallopt(heap._M_TRIM_THRESHOLD, before["trim_threshold"])
    assert heap.current_limits() == before


def test_the_library_compare_leaves_the_allocator_alone(monkeypatch):
    from wadi_probe import heap
    from wadi_probe.analyze import compare

    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda option, value: calls.append((option, value)))
    teacher = {"w.weight": torch.randn(4, 6)}
    compare(teacher, {"w.weight": teacher["w.weight"] + 0.1}, device="cpu", progress=False)
    assert calls == []
