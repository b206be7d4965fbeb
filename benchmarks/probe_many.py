"""Several students against one teacher: one ``compare_many`` call against N separate ``compare`` calls.

The pair of ``benchmarks/probe_sd15.py`` (SD1.5's UNet layout, random weights, cached under
``benchmarks/.cache/``) gives the teacher and the first student; two more students move the same way at 0.5× and
1.5× the strength (``t + α·(s − t)``, written once next to it). Each method runs in its own process and counts
how many teacher tensors it read (every ``Checkpoint.tensor`` call on the teacher file) and its wall time:

* ``many``: ``wadi_probe.compare_many(teacher, [s0.5, s1, s1.5])``: each teacher tensor read once;
* ``separate``: ``wadi_probe.compare(teacher, s)`` three times in one process: each teacher tensor read 3×.

It checks that both give the same per-layer numbers. Usage::

    nice python benchmarks/probe_many.py --size tiny     # 1/10-width SD1.5 layout (seconds)
    nice python benchmarks/probe_many.py --size quick    # quarter width
    nice python benchmarks/probe_many.py                 # full SD1.5 size (3 × 3.4 GB students)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from probe_sd15 import CACHE, SIZES, build_pair  # noqa: E402

STRENGTHS = (0.5, 1.0, 1.5)


def students_for(size: str) -> tuple[Path, list[Path]]:
    """The teacher and the three students (built and cached on first use, one tensor at a time)."""
    teacher, student = build_pair(size)
    paths = []
    for alpha in STRENGTHS:
        if alpha == 1.0:
            paths.append(student)
            continue
        path = student.with_name(student.name.replace("-student", f"-student-x{alpha:g}"))
        if not path.exists():
            from safetensors import safe_open

            from wadi_probe.io.atomic import atomic_path
            from wadi_probe.io.formats.safetensors_io import write_safetensors_streaming

            with safe_open(str(teacher), "pt") as t, safe_open(str(student), "pt") as s:
                keys = list(t.keys())
                specs = {k: (tuple(t.get_slice(k).get_shape()), t.get_tensor(k).dtype) for k in keys}

                def blend(key, t=t, s=s, alpha=alpha):
                    a = t.get_tensor(key)
                    return a + alpha * (s.get_tensor(key) - a)

                with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                    write_safetensors_streaming(handle, keys, specs, blend)
        paths.append(path)
    return teacher, paths


def worker(mode: str, teacher: str, students: list[str], device: str, result: str) -> None:
    """Run one method, counting the teacher reads; write its timings and per-layer angles to ``result``."""
    from wadi_probe import compare
    from wadi_probe.analyze import compare_many
    from wadi_probe.io.checkpoints import Checkpoint

    reads = {"n": 0}
    original = Checkpoint.tensor

    def counting(self, name):
        if str(self.path) == teacher:
            reads["n"] += 1
        return original(self, name)

    Checkpoint.tensor = counting
    started = time.perf_counter()
    if mode == "many":
        reports = list(compare_many(teacher, students, device=device).reports.values())
    else:
        reports = [compare(teacher, s, device=device) for s in students]
    seconds = time.perf_counter() - started
    angles = [[r["angle_deg_mean"] for r in report.layers] for report in reports]
    Path(result).write_text(json.dumps({"seconds": seconds, "teacher_reads": reads["n"],
                                        "tensors": len(reports[0].layers), "angles": angles}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.paths[0], args.paths[1:], args.device, args.result)
        return
    teacher, students = students_for(args.size)
    results = {}
    for mode in ("many", "separate"):
        out = CACHE / f".probe_many-{mode}.json"
        command = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--result", str(out),
                   str(teacher), *map(str, students)]
        subprocess.run(command, check=True)
        results[mode] = json.loads(out.read_text())
        out.unlink()
    agree = max(abs(a - b) for x, y in zip(results["many"]["angles"], results["separate"]["angles"])
                for a, b in zip(x, y) if a is not None and b is not None)
    summary = {
        "size": args.size, "students": len(students), "tensors": results["many"]["tensors"],
        "many": {k: v for k, v in results["many"].items() if k != "angles"},
        "separate": {k: v for k, v in results["separate"].items() if k != "angles"},
        "max_angle_difference_deg": agree,
    }
    summary["speedup"] = round(results["separate"]["seconds"] / results["many"]["seconds"], 2)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
