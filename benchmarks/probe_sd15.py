"""Time `wadi_probe.compare` against the naive way, on a teacher/student pair with the SD1.5 UNet configuration.

The pair is built once (random weights, no downloads) and cached under ``benchmarks/.cache/``:

* teacher: ``UNet2DConditionModel`` with SD1.5's UNet config, random initialisation, fp32 safetensors;
* student, per weight matrix in turn: untouched (bit-identical); rows rescaled only; rotated by a rank-8 LoRaD
  pair-angle field (plus a 0.1 % row rescale); or direction-perturbed by dense noise (plus a rescale);
  1-D tensors: every third rescaled, the rest untouched.

Then, in the same run, each method runs in its own subprocess (so peak resident memory is its own):

* ``naive``: ``safetensors.torch.load_file`` on both files, then per tensor: row norms, cosines, the direction
  residual and ``torch.linalg.svdvals`` of it (energy at 30 % rank) — what one would write by hand;
* ``probe``: ``wadi_probe.compare(teacher, student)`` with spectra (everything in the report);
* ``probe-nospectra``: ``wadi_probe.compare(..., spectra=False)``;
* ``probe-plain-heap`` (with ``--heap-baseline``): ``probe`` without the allocator setting that ``wadi-probe
  compare`` applies (:func:`wadi_probe.heap.reuse_freed_memory`), as the library function runs when a script
  calls it bare: what the setting costs in memory and saves in time.

It reports wall time (inside the worker, from first read to result; and of the whole process) and peak RSS
(the worker's own ``VmHWM``, which exec starts afresh, as ``benchmarks/vsd_step.py`` reads it; ``ru_maxrss`` is
inherited from the parent), and checks that naive and probe agree on the numbers both compute.

Usage::

    nice python benchmarks/probe_sd15.py            # full SD1.5 size (≈860M parameters, 2×3.4 GB cache)
    nice python benchmarks/probe_sd15.py --quick    # quarter-width UNet, for checking
    python benchmarks/probe_sd15.py --size tiny --build-only   # a small pair for trying the CLI
    python benchmarks/probe_sd15.py --device cuda --skip-naive
    python benchmarks/probe_sd15.py --skip-naive --breakdown   # where the full analysis spends its time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"

# The UNet config of Stable Diffusion 1.5 (unet/config.json of the original release), written out here.
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SIZES = {
    "full": {},
    "quick": {"block_out_channels": [160, 320, 640, 640], "cross_attention_dim": 384},  # about 1/4 of the parameters
    "tiny": {"block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64},  # for docs and smoke runs
}

LORAD_RANK = 8


def config_for(size: str) -> dict:
    return {**SD15_UNET_CONFIG, **SIZES[size]}


def pair_paths(size: str, cache: Path = CACHE) -> tuple[Path, Path]:
    tag = "sd15" if size == "full" else f"sd15-{size}"
    return cache / f"{tag}-teacher.safetensors", cache / f"{tag}-student.safetensors"


# ---- building the pair ---------------------------------------------------------------------------------------
def _student_tensor(index: int, name: str, teacher, gen):
    """The student's version of one teacher tensor (see the module docstring for the recipe)."""
    import torch

    from wadi_probe.rotation import rotate_pairs

    if teacher.ndim < 2:
        if index % 3 == 0:
            return teacher * (1 + 1e-3 * torch.randn(teacher.shape, generator=gen))
        return teacher.clone()
    rows = teacher.reshape(teacher.shape[0], -1)
    out, fan_in = rows.shape
    scale = 1 + 1e-3 * torch.randn(out, 1, generator=gen)
    recipe = index % 6
    if recipe == 0:
        return teacher.clone()
    if recipe == 1:
        return (rows * scale).reshape(teacher.shape)
    if recipe in (2, 3) and fan_in >= 2:
        a = torch.randn(out, LORAD_RANK, generator=gen) * 0.03
        b = torch.randn(LORAD_RANK, fan_in // 2, generator=gen)
        return (rotate_pairs(rows, a @ b) * scale).reshape(teacher.shape)
    noise = torch.randn(rows.shape, generator=gen)
    noise *= 0.15 * rows.norm(dim=1, keepdim=True) / math.sqrt(fan_in)
    return ((rows + noise) * scale).reshape(teacher.shape)


def build_pair(size: str, cache: Path = CACHE) -> tuple[Path, Path]:
    """Build and cache the teacher/student pair in ``cache`` (streamed writes: one model in memory)."""
    teacher_path, student_path = pair_paths(size, cache)
    if teacher_path.exists() and student_path.exists():
        return teacher_path, student_path
    import torch
    from diffusers import UNet2DConditionModel

    from wadi_probe.io.atomic import atomic_path
    from wadi_probe.io.formats.safetensors_io import write_safetensors_streaming

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    unet = UNet2DConditionModel(**config_for(size))
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    del unet
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    keys = list(state)
    with atomic_path(teacher_path) as tmp, open(tmp, "wb") as handle:
        write_safetensors_streaming(handle, keys, specs, state.__getitem__)
    gen = torch.Generator().manual_seed(1)
    index_of = {k: i for i, k in enumerate(keys)}
    with atomic_path(student_path) as tmp, open(tmp, "wb") as handle:
        write_safetensors_streaming(handle, keys, specs, lambda k: _student_tensor(index_of[k], k, state[k], gen))
    params = sum(v.numel() for v in state.values())
    print(f"built {teacher_path.name} / {student_path.name}: {len(keys)} tensors, {params / 1e6:.1f}M parameters "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return teacher_path, student_path


# ---- the workers (each runs in its own process) --------------------------------------------------------------
def naive(teacher_path: str, student_path: str, device: str) -> dict:
    """What one writes by hand: load both files whole, then norms, cosines and svdvals per tensor."""
    import torch
    from safetensors.torch import load_file

    teacher = load_file(teacher_path)
    student = load_file(student_path)
    layers = {}
    for name, t in teacher.items():
        s = student.get(name)
        if s is None or s.shape != t.shape:
            continue
        t2 = t.to(device).float().reshape(t.shape[0], -1) if t.ndim >= 2 else t.to(device).float().reshape(1, -1)
        s2 = s.to(device).float().reshape(t2.shape)
        nt, ns = t2.norm(dim=1), s2.norm(dim=1)
        ok = (nt > 0) & (ns > 0)
        t2, s2, nt, ns = t2[ok], s2[ok], nt[ok], ns[ok]
        if t2.shape[0] == 0:
            continue
        norm_change = ((ns - nt).abs() / nt).mean().item()
        cos = (t2 * s2).sum(dim=1) / (nt * ns)
        direction_change = (1 - cos).mean().item()
        record = {"norm_change_mean": norm_change, "direction_change_mean": direction_change}
        if t.ndim >= 2:
            residual = s2 / ns[:, None] - t2 / nt[:, None]
            sigma = torch.linalg.svdvals(residual)
            energy = (sigma**2).cumsum(0) / (sigma**2).sum()
            k = math.ceil(0.3 * min(t2.shape))
            record["residual_energy_at_30pct_rank"] = energy[k - 1].item() if (sigma**2).sum() > 0 else None
        layers[name] = record
    return {"layers": layers}


def probe(teacher_path: str, student_path: str, device: str, spectra: bool, reuse_heap: bool = True) -> dict:
    """``wadi_probe.compare`` as a user calls it (``reuse_heap``: inside the allocator setting the command uses)."""
    import contextlib

    import wadi_probe
    from wadi_probe.heap import reuse_freed_memory

    # the allocator setting the wadi-probe command applies (opt-in, process-wide)
    with reuse_freed_memory() if reuse_heap else contextlib.nullcontext():
        report = wadi_probe.compare(teacher_path, student_path, device=device, spectra=spectra)
    keys = ("norm_change_mean", "direction_change_mean", "residual_energy_at_30pct_rank")
    return {"layers": {r["name"]: {k: r.get(k) for k in keys} for r in report.layers}, "summary": report.summary}


def probe_breakdown(teacher_path: str, student_path: str, device: str) -> dict:
    """The full analysis with the time spent in the Gram products and in the eigenvalue calls summed up."""
    import torch

    from wadi_probe import decompose

    spent = {"gram_s": 0.0, "eigenvalues_s": 0.0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            value = function(*args, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - started
            return value
        return wrapper

    decompose.lower_gram = timed(decompose.lower_gram, "gram_s")
    decompose.symmetric_eigenvalues = timed(decompose.symmetric_eigenvalues, "eigenvalues_s")
    started = time.perf_counter()
    result = probe(teacher_path, student_path, device, spectra=True)
    total = time.perf_counter() - started
    result["breakdown"] = {**spent, "everything_else_s": total - sum(spent.values())}
    return result


def worker(mode: str, teacher_path: str, student_path: str, device: str, result_path: str) -> None:
    from vsd_step import _peak_rss  # the worker's own peak (VmHWM: exec starts it afresh; ru_maxrss is inherited)

    started = time.perf_counter()
    if mode == "naive":
        result = naive(teacher_path, student_path, device)
    elif mode == "probe-breakdown":
        result = probe_breakdown(teacher_path, student_path, device)
    elif mode == "probe-plain-heap":
        result = probe(teacher_path, student_path, device, spectra=True, reuse_heap=False)
    else:
        result = probe(teacher_path, student_path, device, spectra=(mode == "probe"))
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = _peak_rss() / 2**20
    Path(result_path).write_text(json.dumps(result))


def run_worker(mode: str, teacher: Path, student: Path, device: str, timeout: float,
               result_dir: Path = CACHE) -> dict:
    """Run one method in a fresh Python process; return its timings, peak RSS (and GPU memory) and numbers."""
    result_path = result_dir / f"result-{mode}.json"
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--teacher", str(teacher),
           "--student", str(student), "--device", device, "--result", str(result_path)]
    proc = subprocess.run(cmd, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    result["process_seconds"] = wall
    return result


def agreement(naive_result: dict, probe_result: dict) -> dict:
    """Largest absolute differences between the numbers both methods compute."""
    diffs = {}
    for key in ("norm_change_mean", "direction_change_mean", "residual_energy_at_30pct_rank"):
        worst = 0.0
        for name, record in naive_result["layers"].items():
            a, b = record.get(key), probe_result["layers"].get(name, {}).get(key)
            if a is not None and b is not None:
                worst = max(worst, abs(a - b))
        diffs[key] = worst
    return diffs


def warm_page_cache(*paths: Path) -> None:
    """Read the files once so every method starts with them in the page cache."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 26):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Quarter-width UNet (about 1/4 of the parameters).")
    parser.add_argument("--size", choices=sorted(SIZES), help="full (default), quick (= --quick) or tiny.")
    parser.add_argument("--build-only", action="store_true", help="Build (or find) the cached pair, print its paths, stop.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (for all methods).")
    parser.add_argument("--skip-naive", action="store_true", help="Only time the probe.")
    parser.add_argument("--breakdown", action="store_true",
                        help="Also run the full analysis once more, timing its Gram products and eigenvalue calls.")
    parser.add_argument("--heap-baseline", action="store_true",
                        help="Also run the full analysis without the allocator setting of wadi-probe compare.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds before a method is abandoned.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.teacher, args.student, args.device, args.result)
        return

    size = args.size or ("quick" if args.quick else "full")
    teacher, student = build_pair(size)
    if args.build_only:
        print(teacher, student)
        return
    warm_page_cache(teacher, student)
    modes = (["probe-nospectra", "probe"] + (["probe-plain-heap"] if args.heap_baseline else [])
             + (["probe-breakdown"] if args.breakdown else []) + ([] if args.skip_naive else ["naive"]))
    results = {}
    for mode in modes:
        results[mode] = run_worker(mode, teacher, student, args.device, args.timeout)
        r = results[mode]
        print(f"{mode:16s} {r['seconds']:8.1f} s (process {r['process_seconds']:.1f} s)  peak RSS {r['peak_rss_mb']:8.0f} MB",
              flush=True)
        if "breakdown" in r:
            print("                 " + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items()), flush=True)
    load = os.getloadavg()
    summary = {
        "config": f"SD1.5 UNet config, size {size} (block_out_channels {config_for(size)['block_out_channels']})",
        "files_gb": round((teacher.stat().st_size + student.stat().st_size) / 1e9, 2),
        "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_after": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": {m: {k: round(v, 2) for k, v in r.items() if k in ("seconds", "process_seconds", "peak_rss_mb")}
                    for m, r in results.items()},
        **({"breakdown": {k: round(v, 2) for k, v in results["probe-breakdown"]["breakdown"].items()}}
           if "probe-breakdown" in results else {}),
    }
    if "probe-plain-heap" in results:  # what the allocator setting does: time saved, peak memory added
        plain, kept = results["probe-plain-heap"], results["probe"]
        summary["heap_setting"] = {"time_ratio": round(kept["seconds"] / plain["seconds"], 2),
                                   "peak_rss_added_mb": round(kept["peak_rss_mb"] - plain["peak_rss_mb"])}
    if "naive" in results:
        summary["speedup_full"] = round(results["naive"]["seconds"] / results["probe"]["seconds"], 1)
        summary["speedup_nospectra"] = round(results["naive"]["seconds"] / results["probe-nospectra"]["seconds"], 1)
        summary["max_abs_diff_vs_naive"] = agreement(results["naive"], results["probe"])
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
