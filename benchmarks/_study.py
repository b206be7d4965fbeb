"""What the digits study drivers share: the CPU's name for their reports, the results part of a report written
below its declaration, and a pool of logged subprocesses.

Imported by ``digits_study.py``, ``digits_stability.py``, ``demo_seeds.py`` and their report writers (each run as a
script from ``benchmarks/``, which Python puts on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


def cpu_model(default: str | None = None) -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) give it; ``default`` (else the machine type) without one."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 None)
    return found or (default if default is not None else platform.machine())


def replace_results(report: Path, marker: str, results: str) -> None:
    """Write ``results`` into ``report`` in place of everything from ``marker`` on, keeping the part above it (the
    study's declaration, written before its runs); a report that does not exist yet gets ``results`` alone."""
    head = report.read_text(encoding="utf-8").split(marker)[0].rstrip() + "\n\n" if report.exists() else ""
    report.write_text(head + results, encoding="utf-8")


@dataclass
class LoggedProcess:
    """One command of a :func:`run_logged` pool: its output goes to ``log`` (appended to, or written afresh)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path | None = None
    append: bool = False


def run_logged(processes: list[LoggedProcess], workers: int, noun: str) -> None:
    """Run each process, ``workers`` at a time in the order given, printing a line when each starts and ends; exit
    with one sentence naming the logs' folder when any fails (``noun``: what the processes are, plural)."""
    def one(process: LoggedProcess) -> int:
        process.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{time.strftime('%H:%M:%S')} start {process.name}", flush=True)
        with open(process.log, "a" if process.append else "w") as handle:
            code = subprocess.call(process.argv, stdout=handle, stderr=subprocess.STDOUT, cwd=process.cwd,
                                   env={**os.environ, **process.env})
        print(f"{time.strftime('%H:%M:%S')} done {process.name} (exit {code})", flush=True)
        return code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(one, processes))
    if any(codes):
        logs = sorted({str(p.log.parent) for p in processes})
        raise SystemExit(f"{sum(1 for c in codes if c)} of {len(codes)} {noun} failed; see {', '.join(logs)}")
