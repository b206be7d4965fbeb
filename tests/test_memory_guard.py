"""The reason the VSD loop shares one base: its step must take less memory than the paper-style loop.

``benchmarks/vsd_step.py`` runs one VSD step on the small SD-shaped UNet both ways, each in its own process and
measured the same way (peak RSS above the imports): ours (one frozen base, student and fake score as LoRaD
adapters) and the paper-style loop (three UNet copies, adapters as hooks that run each adapted layer twice).
Only the ratio is checked, never a time: memory ratios repeat run to run (0.79-0.82 at batch 1 on a 2-core
VM), timings on a shared CPU do not. A module imported lazily inside the step (pandas was one: +27 MiB, ratio
1.2) or a tensor kept alive for backward shows up here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import vsd_step  # noqa: E402

#: ours / paper-style peak memory must stay below this (measured 0.79-0.82 on the small UNet at batch 1)
LIMIT = 0.9


def test_vsd_step_peak_memory_stays_below_the_paper_style_loop():
    # a parent larger than either worker, as a long pytest session is: ru_maxrss is inherited across fork and exec,
    # so a worker measuring with it read the parent's peak and reported 0 MiB for itself
    parent = bytearray(512 * 2**20)
    parent[::4096] = b"x" * len(parent[::4096])
    result = vsd_step.compare_variants(config="small", batch_size=1, steps=1, warmup=1, threads=1, timeout=300,
                                       parallel=True)
    ours, paper = result["ours"]["peak_bytes"], result["paper"]["peak_bytes"]
    assert paper > 10 * 2**20, f"the paper-style loop's peak ({paper / 2**20:.1f} MiB) is too small to be a real measurement"
    assert result["memory_ratio"] <= LIMIT, (
        f"one VSD step of ours peaked at {ours / 2**20:.1f} MiB, {result['memory_ratio']:.2f}x the paper-style loop's "
        f"{paper / 2**20:.1f} MiB (limit {LIMIT}x); code pages: ours {result['ours']['code_bytes'] / 2**20:.1f}, "
        f"paper {result['paper']['code_bytes'] / 2**20:.1f} MiB")
    assert result["memory_ratio_less_code"] < result["memory_ratio"]


def test_the_training_modules_and_the_report_reader_do_not_import_pandas():
    """pandas (27 MiB) is imported only where a table is built, not by training or by reading a report."""
    code = ("import sys\nimport wadi_distill.vsd.trainer, wadi_distill.vsd.students, wadi_distill.plan.from_report\n"
            "from wadi_probe.report.schema import load_report\nprint('pandas' in sys.modules)")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
