"""A small tmpfs in a private mount namespace (``unshare -rm``): a real full or read-only disk for tests, as root.

Shared by the output guard's own tests and the command-by-command ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout, on one thread."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


def in_tmpfs(mount: Path, code: str, *, size: str = "64k", readonly: bool = False) -> subprocess.CompletedProcess:
    """Run Python with ``mount`` a fresh tmpfs of ``size`` (read-only when asked), in a private mount namespace."""
    mount.mkdir(exist_ok=True)
    remount = f" && mount -o remount,ro {mount}" if readonly else ""
    script = f"mount -t tmpfs -o size={size} tmpfs {mount}{remount} && exec \"$0\" -c \"$1\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, textwrap.dedent(code)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
