"""One prepared check of every CUDA path, at SD1.5 size, in nine minutes; writes one JSON and one Markdown.

Nothing is downloaded: every model has random weights built from a config written here (the SD1.5 UNet config
of ``probe_sd15.py``, an SD VAE, a CLIP text encoder with a real ``CLIPTokenizer`` whose vocab/merges are
written to the scratch folder, the PixArt-α 512 px transformer with a small T5 of PixArt's width).

Sections, in order (each in its own process, under its own time budget; a failure or a time-out is recorded
in the JSON and the next section still runs):

* ``environment``: Python, torch, CUDA, the GPU, package versions, the commit;
* ``cuda_tests``: ``python -m pytest -q -k cuda`` over the project's tests;
* ``vsd_step``: ``vsd_step.compare_variants`` at SD1.5 size (512 px, 64×64 latents, student rank 256, fake
  rank 32) in fp16 and bf16: our step against the paper-style loop, step time, peak memory, their ratios, and
  one profiled step of each (device busy time against wall time, kernel launches);
* ``real_run``: ``wadi-distill run`` on an SD1.5-architecture pipeline folder (batch 8, fp16): 20 steps with
  gradient checkpointing, 6 without: s/step, peak memory; the last steps resumed twice from a checkpoint in
  other folders (bit-identical to the straight run; the two resumes against each other measure the device's own
  nondeterminism), the merged export loaded back and compared with base + adapter;
* ``flow_families``: one VSD step of SANA 1.6B, SD3.5 Large and FLUX.1-dev at 1024 px (random weights built on the
  GPU from ``benchmarks/configs``, bf16, gradient checkpointing, student rank 256, fake rank 32, batch 1) with
  ``flow_memory.py --device cuda``: step time, peak memory allocated and reserved, against the fake-tensor estimate
  of ``flow_memory.py`` computed on the host's CPU from the check's start. On a CPU (``--size tiny``) the families'
  tiny configs: the metered real step against the estimate (equal to the byte);
* ``pixart``: ``wadi-distill run`` on a PixArt-α-sized pipeline folder in bf16, a few steps: s/step, peak memory;
* ``probe``: ``wadi_probe.compare`` on the SD1.5-sized pair of ``probe_sd15.py`` on the device — wall time
  (read + compute, full analysis and ``spectra=False``), peak GPU and host memory — and the largest
  difference from the CPU numbers on a few layers.

Usage (on a GPU machine without network; ``--wheels`` installs the wheels in that folder first, ``--install``
installs the project from this working tree, both into a folder under the scratch folder, nothing system-wide)::

    python benchmarks/gpu_check.py --size sd15 --out OUT --wheels .whl --install
    python benchmarks/gpu_check.py --size tiny --out /tmp/check        # the same sections, tiny, on a CPU
    python benchmarks/gpu_check.py --size sd15 --out OUT --only probe,pixart --budget probe=120

The outputs are ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (and ``OUT/gpu_check.log``, every section's
output); the large files (pairs, pipelines, runs) go to a scratch folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts (probe_sd15, vsd_step) are imported as modules

# in the order they run: what only a GPU run can show first (the CUDA tests, the VSD step against the paper-style
# loop, the main job end to end), the probe last (measured on a GPU already: 7.7 s, commit 1b8a9ad)
SECTIONS = ("environment", "cuda_tests", "vsd_step", "real_run", "flow_families", "pixart", "probe")
FP32_EPS = 2.0**-23  # the rounding unit of the fp32 numbers the CPU and the GPU compute

# What each section runs, per size. "sd15" is SD1.5's size (PixArt-α 512 px for pixart); "tiny" the same
# architectures, small enough for a CPU in a test. The budgets (seconds) are caps, sized from the first GPU run
# (H200, 2026-12-04); the time limit keeps the whole sd15 check within 9 minutes, one device call (a section that
# would start past it is recorded as skipped, and the check ends by printing the command that runs the rest).
PLANS: dict[str, dict[str, Any]] = {
    "tiny": {
        "probe": {"pair": "tiny", "layers": 4},
        "vsd_step": {"config": "small", "batch_size": 1, "rank": 8, "fake_rank": 4, "steps": 2, "warmup": 1},
        "real_run": {"model": "tiny", "batch_size": 2, "steps": 4, "resume_from": 2, "steps_no_checkpointing": 3,
                     "rank": 8, "fake_rank": 4},
        "pixart": {"model": "tiny", "batch_size": 2, "steps": 3, "rank": 8, "fake_rank": 4},
        "flow_families": {"families": ["sd3", "flux", "sana"], "tiny": True, "batch_size": 1, "rank": 4,
                          "fake_rank": 2, "steps": 2},
        "budgets": {"environment": 30, "cuda_tests": 90, "probe": 90, "vsd_step": 120, "real_run": 240,
                    "pixart": 90, "flow_families": 90},
        "time_limit": 900,
    },
    "sd15": {
        "probe": {"pair": "full", "layers": 6},
        "vsd_step": {"config": "sd15", "batch_size": 2, "rank": 256, "fake_rank": 32, "steps": 4, "warmup": 2},
        # each `wadi-distill run` process spends about a minute outside its steps at this size (loading, the
        # embedding cache, the merged export and the samples; 58 s of 125 s on the H200), so few steps each
        "real_run": {"model": "sd15", "batch_size": 8, "steps": 20, "resume_from": 17, "steps_no_checkpointing": 6,
                     "rank": 256, "fake_rank": 32},
        "pixart": {"model": "alpha-512", "batch_size": 4, "steps": 6, "rank": 256, "fake_rank": 32},
        # the published configs of benchmarks/configs (SD3.5 Large, FLUX.1-dev, SANA 1.6B 1024 px), 1024 px
        "flow_families": {"families": ["sana", "sd3", "flux"], "tiny": False, "batch_size": 1, "rank": 256,
                          "fake_rank": 32, "steps": 2},
        "budgets": {"environment": 20, "cuda_tests": 45, "probe": 90, "vsd_step": 150, "real_run": 300,
                    "pixart": 60, "flow_families": 240},
        "time_limit": 540,
    },
}
PROMPT_WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "cat", "dog", "house", "tree", "car", "on",
                "in", "sky", "big", "small", "painting", "drawing"]


class SectionProblem(Exception):
    """A section could not produce its numbers (the message is recorded as the section's error)."""


@dataclass
class Context:
    """What a section needs to know: the size, the device, where to write, and until when it may run."""

    size: str
    device: str
    scratch: str
    deadline: float
    result_path: str = ""
    last: dict[str, Any] = field(default_factory=dict)

    def save(self, result: dict[str, Any]) -> None:
        """Keep what a section has measured so far: a section stopped later still reports it."""
        self.last = result
        if self.result_path:
            Path(self.result_path).write_text(json.dumps({**result, "status": "partial"}, indent=1, default=str))

    @property
    def plan(self) -> dict[str, Any]:
        return PLANS[self.size]

    def folder(self, name: str) -> Path:
        path = Path(self.scratch) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def left(self) -> float:
        """Seconds left before this section's deadline (at least 1, so a last subprocess still gets a timeout)."""
        return max(1.0, self.deadline - time.time())


# ------------------------------------------------------------------------------------------ measuring helpers
# A ``sitecustomize`` put first on the PYTHONPATH of the processes we measure: at exit it appends their peak
# GPU memory (allocated and reserved by torch's allocator) and peak RSS to the file named by
# WADI_GPU_CHECK_METER. It measures the real ``wadi-distill`` console script without changing it.
METER_SOURCE = '''\
import atexit, json, os, resource, sys

def _wadi_gpu_check_meter():
    path = os.environ.get("WADI_GPU_CHECK_METER")
    if not path:
        return
    record = {"pid": os.getpid(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\\n")

atexit.register(_wadi_gpu_check_meter)

# this file shadows any sitecustomize further down the path (an image may set up CUDA libraries in one): run it
import importlib.util as _util
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _candidate = os.path.join(os.path.abspath(_entry or "."), "sitecustomize.py")
    if os.path.dirname(_candidate) != _here and os.path.isfile(_candidate):
        _spec = _util.spec_from_file_location("_wadi_gpu_check_next_sitecustomize", _candidate)
        _spec.loader.exec_module(_util.module_from_spec(_spec))
        break
'''


def _meter_env(ctx: Context, name: str) -> tuple[dict[str, str], Path]:
    """Environment for a measured subprocess, and the file its meter record will be appended to."""
    meter_dir = ctx.folder("meter")
    (meter_dir / "sitecustomize.py").write_text(METER_SOURCE)
    record = meter_dir / f"{name}.jsonl"
    record.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(meter_dir), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["WADI_GPU_CHECK_METER"] = str(record)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env, record


def _read_meter(record: Path) -> dict[str, float]:
    """The peaks the meter wrote (the largest over the processes that wrote; empty if none did)."""
    if not record.is_file():
        return {}
    peaks: dict[str, float] = {}
    for line in record.read_text().splitlines():
        for key, value in json.loads(line).items():
            if key != "pid":
                peaks[key] = round(max(peaks.get(key, 0.0), float(value)), 1)
    return peaks


def _run(cmd: list[str], ctx: Context, *, env: dict[str, str] | None = None, cwd: Path | None = None,
         what: str = "") -> subprocess.CompletedProcess:
    """Run ``cmd`` with the section's remaining time as timeout; its output is echoed into the section log."""
    try:
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=ctx.left())
    except subprocess.TimeoutExpired as exc:
        raise SectionProblem(f"{what or cmd[0]} did not finish within the section's time budget") from exc
    sys.stdout.write(done.stdout[-20000:])
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SectionProblem(f"{what or cmd[0]} failed with exit code {done.returncode}: {tail}")
    return done


def _build_in_fresh_process(ctx: Context, call: str) -> float:
    """Run a builder (``call``, a Python expression over this module) in its own process; its seconds.

    Linux carries a process's peak RSS across fork+exec, so models built in the section's process would show
    up in the peak RSS of every worker it starts afterwards; built elsewhere, they do not.
    """
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; "
            f"import gpu_check, probe_sd15; {call}")
    started = time.perf_counter()
    _run([sys.executable, "-c", code], ctx, what="building the models")
    return time.perf_counter() - started


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max (the spread tells whether a ratio of two medians is more than noise)."""
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _release_gpu_cache() -> None:
    """Hand back what this process's allocator still caches, so the next measured process has the GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ section: environment
def section_environment(ctx: Context) -> dict[str, Any]:
    """Versions and the machine, so that every number below can be tied to what produced it."""
    import importlib.metadata as metadata

    import torch

    packages = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "peft", "scipy",
                 "numpy", "typer", "rich", "pytest", "wadi"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "host_memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "packages": packages, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "wadi_distill_command": shutil.which("wadi-distill"), "wadi_probe_command": shutil.which("wadi-probe"),
    }
    import wadi_distill

    info["wadi_imported_from"] = str(Path(wadi_distill.__file__).resolve().parent.parent)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


# ------------------------------------------------------------------------------------------ section: cuda_tests
def section_cuda_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -k cuda`` over the project's tests (collection errors of unrelated modules do not stop it)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rsE", "-k", "cuda", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "--ignore", str(ROOT / "tests" / "test_gpu_check.py"), "tests"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx.left())
    except subprocess.TimeoutExpired as exc:
        raise SectionProblem("the CUDA tests did not finish within the section's time budget") from exc
    sys.stdout.write(done.stdout[-20000:])
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = {{"errors": "error"}.get(word, word): int(n)
              for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors|error|xfailed|xpassed)", summary)}
    result: dict[str, Any] = {"command": "python -m pytest -q -k cuda", "exit_code": done.returncode,
                              "summary": summary, "counts": counts,
                              "skip_reasons": sorted({line.split(" ", 2)[-1] for line in lines if line.startswith("SKIPPED")})}
    # modules that could not be imported (e.g. the notebook tests where nbclient is not installed) are listed;
    # they count as a problem only when no CUDA test ran at all
    errors = [line[len("ERROR "):] for line in lines if line.startswith("ERROR ")]
    result["collection_errors"] = [e for e in errors if "::" not in e.split(" ", 1)[0]]
    problems = []
    if counts.get("failed"):
        problems.append(f"{counts['failed']} CUDA tests failed")
    if len(errors) > len(result["collection_errors"]):
        problems.append(f"{len(errors) - len(result['collection_errors'])} CUDA tests errored in set-up or tear-down")
    if not any(counts.get(k) for k in ("passed", "failed", "skipped")):
        problems.append("no CUDA test was collected")
    if ctx.device == "cuda" and counts.get("skipped"):
        problems.append(f"{counts['skipped']} CUDA tests were skipped on a CUDA machine")
    result["problems"] = problems
    return result


# ------------------------------------------------------------------------------------------ section: probe
def _layer_numbers(record: dict[str, Any]) -> dict[str, float]:
    """The scalar numbers of one report layer (booleans and text left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def section_probe(ctx: Context) -> dict[str, Any]:
    """The probe of the SD1.5-sized pair on the device, and its agreement with the CPU on a few layers."""
    import probe_sd15
    from safetensors import safe_open
    from safetensors.torch import save_file

    import wadi_probe

    plan = ctx.plan["probe"]
    cache = ctx.folder("probe")
    build_s = _build_in_fresh_process(ctx, f"probe_sd15.build_pair({plan['pair']!r}, Path({str(cache)!r}))")
    teacher, student = probe_sd15.pair_paths(plan["pair"], cache)
    result: dict[str, Any] = {
        "pair": f"SD1.5 UNet config, size {plan['pair']}", "build_s": round(build_s, 1),
        "files_gb": round((teacher.stat().st_size + student.stat().st_size) / 1e9, 2),
        "page_cache": "warm (files read once before timing)", "device": ctx.device,
    }
    probe_sd15.warm_page_cache(teacher, student)
    runs = {}
    for mode in ("probe", "probe-nospectra"):
        run = probe_sd15.run_worker(mode, teacher, student, ctx.device, ctx.left(), cache)
        runs[mode] = run
        result[mode] = {k: round(v, 2) for k, v in run.items()
                        if k in ("seconds", "process_seconds", "peak_rss_mb", "peak_gpu_mb")}
    result["layers_total"] = len(runs["probe"]["layers"])
    ctx.save(result)

    # the CPU reference on a few layers: a small pair holding just those tensors, compared on the CPU and on the
    # device in this process; and the device numbers of the full run checked against the CPU ones
    names = [n for n, r in runs["probe"]["layers"].items() if r.get("residual_energy_at_30pct_rank") is not None]
    with safe_open(str(teacher), "pt") as t_file:
        names.sort(key=lambda n: -math.prod(t_file.get_slice(n).get_shape()))
    step = max(1, len(names) // plan["layers"])
    chosen = names[::step][: plan["layers"]]
    small_t, small_s = cache / "few-teacher.safetensors", cache / "few-student.safetensors"
    for source, target in ((teacher, small_t), (student, small_s)):
        with safe_open(str(source), "pt") as handle:
            save_file({n: handle.get_tensor(n) for n in chosen}, str(target))
    cpu = {r["name"]: r for r in wadi_probe.compare(small_t, small_s, device="cpu").layers}
    dev = {r["name"]: r for r in wadi_probe.compare(small_t, small_s, device=ctx.device).layers}
    worst_abs, worst_rel, worst_field = 0.0, 0.0, None
    for name in chosen:
        a, b = _layer_numbers(cpu[name]), _layer_numbers(dev[name])
        for key in a.keys() & b.keys():
            diff = abs(a[key] - b[key])
            rel = diff / max(abs(a[key]), 1e-30)
            if diff > worst_abs:
                worst_abs, worst_field = diff, f"{name}: {key}"
            worst_rel = max(worst_rel, rel if abs(a[key]) > 1e-6 else 0.0)
    full_vs_cpu = {}
    for key in ("norm_change_mean", "direction_change_mean", "residual_energy_at_30pct_rank"):
        diffs = [abs(runs["probe"]["layers"][n][key] - cpu[n][key]) for n in chosen
                 if runs["probe"]["layers"][n].get(key) is not None and cpu[n].get(key) is not None]
        full_vs_cpu[key] = max(diffs) if diffs else None
    result["cpu_agreement"] = {
        "layers": chosen,
        "max_abs_diff_all_fields": worst_abs, "max_abs_diff_field": worst_field,
        "max_rel_diff_all_fields": worst_rel, "max_abs_diff_full_run_vs_cpu": full_vs_cpu,
        "fp32_rounding_unit": FP32_EPS,
    }
    result["targets"] = {"probe_full_analysis_le_10_s": runs["probe"]["seconds"] <= 10.0}
    _synchronize(ctx.device)
    shutil.rmtree(cache, ignore_errors=True)  # 7 GB at SD1.5 size: the next sections need the disk
    return result


# ------------------------------------------------------------------------------------------ section: vsd_step
def section_vsd_step(ctx: Context) -> dict[str, Any]:
    """Our VSD step against the paper-style loop, in fp16 and bf16 on a GPU (fp32 on a CPU)."""
    import vsd_step

    plan = ctx.plan["vsd_step"]
    precisions = ("fp16", "bf16") if ctx.device == "cuda" else ("no",)  # fp32 on a CPU, see _precision
    result: dict[str, Any] = {"config": plan["config"], "batch_size": plan["batch_size"], "rank": plan["rank"],
                              "fake_rank": plan["fake_rank"], "precisions": {}}
    for precision in precisions:
        out = vsd_step.compare_variants(device=ctx.device, config=plan["config"], batch_size=plan["batch_size"],
                                        rank=plan["rank"], fake_rank=plan["fake_rank"], mixed_precision=precision,
                                        steps=plan["steps"], warmup=plan["warmup"],
                                        threads=min(8, os.cpu_count() or 1) if ctx.device == "cuda" else 1,
                                        timeout=ctx.left(), profile=True)
        entry = {"peak_memory": out["peak_memory"], "adapted_layers": out["ours"]["adapted_layers"],
                 "time_ratio": round(out["time_ratio"], 3), "memory_ratio": round(out["memory_ratio"], 3)}
        for variant in ("paper", "ours"):
            times = out[variant]["step_s"]
            entry[variant] = {"step_s": {k: round(v, 4) for k, v in _spread(times).items()},
                              "peak_mb": round(out[variant]["peak_bytes"] / 2**20, 1),
                              "profile": out[variant].get("profile")}
        entry["targets"] = {"time_ratio_le_0.7": out["time_ratio"] <= 0.7, "memory_ratio_le_0.6": out["memory_ratio"] <= 0.6}
        result["precisions"][precision] = entry
        ctx.save(result)
    return result


# ------------------------------------------------------------------------------------------ pipeline folders
def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet CLIP's tokenizer works in: printable bytes map to themselves, the others to
    code points from 256 up (written here because transformers no longer exports its copy)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(folder: Path, words: list[str], max_length: int = 77):
    """A real ``CLIPTokenizer`` from a small vocab.json/merges.txt (the byte alphabet, the words, the two
    specials), saved with ``save_pretrained``; vocab/merges are kept beside it for older transformers."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:  # merge each word left to right into one end-of-word token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _word_tokenizer(folder: Path, words: list[str], max_length: int) -> int:
    """A word-level fast tokenizer for the T5 encoder (PixArt's own is sentencepiece; any tokenizer will do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)
    fast.save_pretrained(folder)
    return len(vocab)


def _vae(model: str):
    from diffusers import AutoencoderKL

    if model == "tiny":
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=4, sample_size=32)
    # the SD1.x / PixArt-α VAE (sd-vae-ft-ema) configuration
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def _unet_config(model: str) -> dict[str, Any]:
    import probe_sd15

    if model == "tiny":
        return {**probe_sd15.config_for("tiny"), "sample_size": 16}
    return probe_sd15.config_for("full")


def build_sd_pipeline(folder: Path, model: str, device: str) -> Path:
    """An SD1.5-architecture ``StableDiffusionPipeline`` folder with random weights (weights initialised on
    ``device`` for speed, written as fp32 safetensors)."""
    import diffusers
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet_config = _unet_config(model)
    tokenizer = write_clip_tokenizer(folder / "tokenizer", PROMPT_WORDS)
    with torch.device(device):  # random initialisation is much faster on a GPU; the files are written from the CPU
        UNet2DConditionModel(**unet_config).to("cpu").save_pretrained(folder / "unet")
        _vae(model).to("cpu").save_pretrained(folder / "vae")
        width = int(unet_config["cross_attention_dim"])
        big = model != "tiny"
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 2,
                              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        CLIPTextModel(text).to("cpu").save_pretrained(folder / "text_encoder")
    _release_gpu_cache()
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def build_pixart_pipeline(folder: Path, model: str, device: str) -> Path:
    """A ``PixArtAlphaPipeline`` folder: the PixArt-α 512 px transformer (28 blocks, width 1152, random
    weights) and a one-block T5 of PixArt's caption width 4096 (T5-XXL's 4.7B parameters are not needed to
    exercise the transformer)."""
    import diffusers
    import torch
    from diffusers import DDPMScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    if model == "tiny":
        config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                      sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=4,
                      norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                      use_additional_conditions=False)
        t5 = dict(d_kv=8, d_ff=32, num_heads=2)
    else:  # PixArt-XL-2-512x512's transformer/config.json
        config = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                      dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=64,
                      patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                      upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
                      norm_eps=1e-6, caption_channels=4096, use_additional_conditions=False)
        t5 = dict(d_kv=64, d_ff=256, num_heads=2)
    vocab_size = _word_tokenizer(folder / "tokenizer", PROMPT_WORDS, max_length=120)
    with torch.device(device):  # random initialisation on the device, files written from the CPU
        PixArtTransformer2DModel(**config).to("cpu").save_pretrained(folder / "transformer")
        _vae(model).to("cpu").save_pretrained(folder / "vae")
        T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=config["caption_channels"], num_layers=1,
                                decoder_start_token_id=0, **t5)).to("cpu").save_pretrained(folder / "text_encoder")
    _release_gpu_cache()
    DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(folder / "scheduler")
    index = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def _prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    colours, things = ["red", "blue", "green"], ["cat", "dog", "house", "tree", "car"]
    path.write_text("".join(f"a photo of a {c} {t}\n" for c in colours for t in things))
    return path


# ------------------------------------------------------------------------------------------ `wadi-distill run`
def _distill_command() -> str:
    found = shutil.which("wadi-distill")
    if found is None:
        raise SectionProblem("the wadi-distill command is not installed here; run with --install")
    return found


def _precision(ctx: Context, wanted: str) -> str:
    """The wanted half precision on a GPU; fp32 on a CPU (fp16 is refused there, and bf16 autocast on a CPU
    is many times slower than fp32, which would make the tiny check slow without testing anything more)."""
    return wanted if ctx.device == "cuda" else "no"


def distill_run(ctx: Context, name: str, teacher: Path, out: Path, prompts: Path, *, steps: int, batch_size: int,
                rank: int, fake_rank: int, precision: str, checkpointing: bool, checkpoint_every: int,
                resume: Path | None = None) -> dict[str, Any]:
    """One ``wadi-distill run``: its wall time, s/step (from its loss log; step 1 left out as warm-up) and peaks."""
    cmd = [_distill_command(), "run", "--teacher", str(teacher), "--output-dir", str(out), "--prompts", str(prompts),
           "--rank", str(rank), "--fake-rank", str(fake_rank), "--max-steps", str(steps), "--batch-size",
           str(batch_size), "--mixed-precision", precision, "--device", ctx.device, "--checkpointing-steps",
           str(checkpoint_every), "--no-tensorboard", "--seed", "0"]
    if checkpointing:
        cmd.append("--gradient-checkpointing")
    if resume is not None:
        cmd += ["--resume", str(resume)]
    env, record = _meter_env(ctx, name)
    started = time.perf_counter()
    _run(cmd, ctx, env=env, what=f"wadi-distill run ({name})")
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "logs" / "losses.jsonl").read_text().splitlines() if line.strip()]
    # the process's first step (CUDA kernels chosen, memory allocated) is left out as warm-up
    times = [r["step_seconds"] for r in log if "step_seconds" in r][1:]
    losses = log[-1] if log else {}
    return {"command": " ".join(["wadi-distill"] + cmd[1:]), "wall_s": round(wall, 1),
            "steps_logged": len(log), "s_per_step": {k: round(v, 4) for k, v in _spread(times).items()},
            "final_losses": {k: round(v, 5) for k, v in losses.items() if k.startswith("loss")},
            **_read_meter(record)}


def _compare_safetensors(a: Path, b: Path) -> dict[str, Any]:
    """Tensor by tensor: how many differ and by how much at most (0 and 0.0 when bit-identical)."""
    import torch
    from safetensors import safe_open

    differing, worst, count = 0, 0.0, 0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return {"same_keys": False, "bit_identical": False}
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            count += 1
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
                differing += 1
                if ta.shape == tb.shape:
                    worst = max(worst, (ta.double() - tb.double()).abs().max().item())
    return {"same_keys": True, "tensors": count, "tensors_differing": differing, "max_abs_diff": worst,
            "bit_identical": differing == 0}


def check_merged_export(ctx: Context, pipeline: Path, final: Path) -> dict[str, Any]:
    """Load the merged ``student.safetensors`` back into a UNet and compare it with the teacher + adapter on one
    input at the student's timestep (fp32, TF32 off): the export must be the trained student."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    import wadi_distill

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    merged_file = final / "student.safetensors"
    base = UNet2DConditionModel.from_pretrained(pipeline / "unet", local_files_only=True)
    teacher_layout = {k: (v.dtype, tuple(v.shape)) for k, v in base.state_dict().items()}
    merged = UNet2DConditionModel.from_config(base.config)
    state = load_file(str(merged_file))
    missing, unexpected = merged.load_state_dict(state, strict=False)
    same_keys = set(state) == set(teacher_layout)
    dtypes_match = same_keys and all((v.dtype, tuple(v.shape)) == teacher_layout[k] for k, v in state.items())
    wadi_distill.load_adapter(base, final, adapter_name="student", activate=True)
    base.to(ctx.device).eval()
    merged.to(ctx.device).eval()
    gen = torch.Generator().manual_seed(0)
    size = int(base.config.sample_size)
    x = torch.randn(1, 4, size, size, generator=gen).to(ctx.device)
    cond = torch.randn(1, 77, int(base.config.cross_attention_dim), generator=gen).to(ctx.device)
    t = torch.tensor([999], device=ctx.device)
    with torch.no_grad():
        live = base(x, t, encoder_hidden_states=cond, return_dict=False)[0].double()
        loaded = merged(x, t, encoder_hidden_states=cond, return_dict=False)[0].double()
    diff = (live - loaded).abs().max().item()
    scale = loaded.abs().max().item()
    return {"file_gb": round(merged_file.stat().st_size / 1e9, 2), "keys_as_teacher": same_keys,
            "dtypes_and_shapes_as_teacher": dtypes_match, "missing_keys": len(missing), "unexpected_keys": len(unexpected),
            "max_abs_diff_vs_adapter": diff, "output_max_abs": scale,
            "relative_diff": diff / max(scale, 1e-30), "fp32_rounding_unit": FP32_EPS}


def section_real_run(ctx: Context) -> dict[str, Any]:
    """``wadi-distill run`` at SD1.5 size: checkpointing on (resumed bit-identically) and off, the export read back."""
    plan = ctx.plan["real_run"]
    folder = ctx.folder("real_run")
    pipeline = folder / "sd15-pipeline"
    build_s = _build_in_fresh_process(
        ctx, f"gpu_check.build_sd_pipeline(Path({str(pipeline)!r}), {plan['model']!r}, {ctx.device!r})")
    prompts = _prompts(folder)
    result: dict[str, Any] = {"pipeline": f"StableDiffusionPipeline, UNet size {plan['model']}, random weights",
                              "build_s": round(build_s, 1)}
    precision = _precision(ctx, "fp16")
    common = dict(batch_size=plan["batch_size"], rank=plan["rank"], fake_rank=plan["fake_rank"], precision=precision)
    # every `wadi-distill run` first, the comparisons after: Linux hands a process's peak RSS on to the programs
    # it starts, so reading models in this process before a run would inflate that run's peak RSS
    straight = folder / "with-checkpointing"
    result["checkpointing_on"] = distill_run(ctx, "checkpointing-on", pipeline, straight, prompts,
                                             steps=plan["steps"], checkpointing=True,
                                             checkpoint_every=plan["resume_from"], **common)
    ctx.save(result)
    result["checkpointing_off"] = distill_run(ctx, "checkpointing-off", pipeline, folder / "without-checkpointing",
                                              prompts, steps=plan["steps_no_checkpointing"], checkpointing=False,
                                              checkpoint_every=plan["steps_no_checkpointing"], **common)
    shutil.rmtree(folder / "without-checkpointing", ignore_errors=True)
    ctx.save(result)
    resumed = folder / "resumed"
    checkpoint = straight / f"checkpoint-{plan['resume_from']}"
    result["resumed"] = distill_run(ctx, "resumed", pipeline, resumed, prompts, steps=plan["steps"],
                                    checkpointing=True, checkpoint_every=plan["resume_from"], resume=checkpoint,
                                    **common)
    ctx.save(result)
    # the same resume once more: what two runs from one checkpoint differ by is what the GPU's own
    # nondeterminism (atomics in attention and convolution backward passes) gives, the reference for the above
    again = folder / "resumed-again"
    result["resumed_again"] = distill_run(ctx, "resumed-again", pipeline, again, prompts, steps=plan["steps"],
                                          checkpointing=True, checkpoint_every=plan["resume_from"],
                                          resume=checkpoint, **common)
    ctx.save(result)
    last = f"checkpoint-{plan['steps']}"
    result["resume_check"] = {
        "resumed_from": checkpoint.name, "compared": last,
        "student": _compare_safetensors(straight / last / "student.safetensors", resumed / last / "student.safetensors"),
        "fake": _compare_safetensors(straight / last / "fake.safetensors", resumed / last / "fake.safetensors"),
        "merged_export": _compare_safetensors(straight / "final" / "student.safetensors",
                                              resumed / "final" / "student.safetensors"),
        "two_resumes_student": _compare_safetensors(resumed / last / "student.safetensors",
                                                    again / last / "student.safetensors"),
        "two_resumes_fake": _compare_safetensors(resumed / last / "fake.safetensors", again / last / "fake.safetensors"),
    }
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.rmtree(again, ignore_errors=True)
    ctx.save(result)
    result["export_check"] = check_merged_export(ctx, pipeline, straight / "final")
    _release_gpu_cache()
    on, off = result["checkpointing_on"], result["checkpointing_off"]
    if on.get("s_per_step") and off.get("s_per_step"):
        result["checkpointing_time_ratio"] = round(on["s_per_step"]["median"] / off["s_per_step"]["median"], 3)
    if on.get("peak_gpu_allocated_mb") and off.get("peak_gpu_allocated_mb"):
        result["checkpointing_memory_ratio"] = round(on["peak_gpu_allocated_mb"] / off["peak_gpu_allocated_mb"], 3)
        # a 24 GB card has 24 GiB; about 1 GiB of it goes to the CUDA context and the display
        result["targets"] = {"batch8_fp16_checkpointing_fits_24_gb":
                             plan["batch_size"] == 8 and precision == "fp16" and on["peak_gpu_reserved_mb"] < 23 * 1024}
    check = result["resume_check"]
    problems = [f"the resumed {k} differs from the straight run's" for k in ("student", "fake", "merged_export")
                if not check[k]["bit_identical"]]
    if not (check["two_resumes_student"]["bit_identical"] and check["two_resumes_fake"]["bit_identical"]):
        problems.append("two resumes from the same checkpoint differ too: these runs are not deterministic on this "
                        "device, so a difference from the straight run is not by itself a resume fault")
    export = result["export_check"]
    if not (export["keys_as_teacher"] and export["missing_keys"] == 0 and export["unexpected_keys"] == 0):
        problems.append("the merged export does not load into the teacher's architecture key for key")
    if export["relative_diff"] > 1e-4:
        problems.append("the merged export's output differs from teacher + adapter by more than 1e-4 relative")
    result["problems"] = problems
    shutil.rmtree(folder, ignore_errors=True)  # about 10 GB at SD1.5 size
    return result


def section_pixart(ctx: Context) -> dict[str, Any]:
    """A few VSD steps of ``wadi-distill run`` on a PixArt-α-sized transformer in bf16 (fp32 on a CPU)."""
    plan = ctx.plan["pixart"]
    folder = ctx.folder("pixart")
    pipeline = folder / "pixart-pipeline"
    build_s = _build_in_fresh_process(
        ctx, f"gpu_check.build_pixart_pipeline(Path({str(pipeline)!r}), {plan['model']!r}, {ctx.device!r})")
    result: dict[str, Any] = {"pipeline": f"PixArtAlphaPipeline, transformer size {plan['model']}, random weights",
                              "build_s": round(build_s, 1)}
    result["run"] = distill_run(ctx, "pixart", pipeline, folder / "run", _prompts(folder), steps=plan["steps"],
                                batch_size=plan["batch_size"], rank=plan["rank"], fake_rank=plan["fake_rank"],
                                precision=_precision(ctx, "bf16"), checkpointing=False, checkpoint_every=plan["steps"])
    return result


ESTIMATES_FOLDER = "flow-estimates"  # under the scratch folder: the fake-tensor estimates of the real-size steps


def _flow_flags(plan: dict[str, Any]) -> list[str]:
    """``flow_memory.py``'s step options of the plan, the same for the estimate and the measured step."""
    return ["--batch-size", str(plan["batch_size"]), "--rank", str(plan["rank"]), "--fake-rank",
            str(plan["fake_rank"]), "--precision", "bf16"]


def start_flow_estimates(plan: dict[str, Any], scratch: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """Start the CPU estimates of the flow families' real-size steps, one single-thread process each.

    They take minutes on a host CPU (FLUX.1-dev: 199 s on one core), so they start with the check and run beside
    the GPU sections; ``flow_families`` reads what they wrote (``<family>.json``, ``.err`` and ``.rc``).
    """
    folder = scratch / ESTIMATES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for family in plan["families"]:
        cmd = [sys.executable, str(HERE / "flow_memory.py"), "--family", family, *_flow_flags(plan), "--json",
               str(folder / f"{family}.json")]
        script = f'{" ".join(map(shlex.quote, cmd))} >/dev/null 2>{shlex.quote(str(folder / (family + ".err")))}; ' \
                 f'echo $? > {shlex.quote(str(folder / (family + ".rc")))}'
        procs.append(subprocess.Popen(["sh", "-c", script], env={**env, "OMP_NUM_THREADS": "1"},
                                      start_new_session=True))
    return procs


def _wait_for_estimate(folder: Path, family: str, ctx: Context) -> tuple[dict[str, Any], str]:
    """The estimate ``start_flow_estimates`` wrote for ``family``, waiting for it while the section has time."""
    rc_file = folder / f"{family}.rc"
    while not rc_file.is_file():
        if ctx.left() <= 1:
            return {}, "the estimate did not finish within the section's time budget"
        time.sleep(1)
    if rc_file.read_text().strip() != "0":
        err = (folder / f"{family}.err").read_text() if (folder / f"{family}.err").is_file() else ""
        return {}, (err.strip().splitlines() or ["the estimate failed"])[-1][-800:]
    return json.loads((folder / f"{family}.json").read_text()), ""


def section_flow_families(ctx: Context) -> dict[str, Any]:
    """The VSD step of each flow-matching family at its real size on the device, against the CPU estimate."""
    import flow_memory

    plan = ctx.plan["flow_families"]
    folder = ctx.folder("flow_families")
    script = str(HERE / "flow_memory.py")
    common = _flow_flags(plan)
    args: dict[str, list[str]] = {}
    tiny: dict[str, dict[str, Any]] = {}
    for family in plan["families"]:
        if plan["tiny"]:
            config, size = flow_memory.write_tiny_config(family, folder)
            tiny[family] = {"config": config, "image_size": size}
            args[family] = ["--family", family, "--config", str(config), "--image-size", str(size), *common]
        else:
            args[family] = ["--family", family, *common]
    result: dict[str, Any] = {"batch_size": plan["batch_size"], "rank": plan["rank"], "fake_rank": plan["fake_rank"],
                              "precision": "bf16", "checkpointing": True, "families": {}}
    problems = []
    for family, a in args.items():
        entry: dict[str, Any] = {}
        try:
            if ctx.device == "cuda":  # each family in its own process: its own peak, its memory handed back
                out = folder / f"{family}-measured.json"
                cmd = [sys.executable, script, *a, "--device", "cuda", "--steps", str(plan["steps"]), "--json",
                       str(out)]
                _run(cmd, ctx, what=f"the {family} step")
                measured = json.loads(out.read_text())
            else:  # the tiny configs: the same step on real CPU tensors, metered, in this process
                measured = flow_memory.estimate(family, tiny[family]["config"], batch=plan["batch_size"],
                                                rank=plan["rank"], fake_rank=plan["fake_rank"], precision="bf16",
                                                image_size=tiny[family]["image_size"], fake=False)
            entry = {"config": measured["config"], "class": measured["class"],
                     "base_params": measured["base_params"], "student_params": measured["student_params"]}
            if ctx.device == "cuda":
                entry.update(build_s=measured["build_s"], gpu=measured["gpu"],
                             step_s={k: round(v, 4) for k, v in _spread(measured["step_s"]).items()},
                             peak_allocated_mb=round(measured["peak_allocated_bytes"] / 2**20, 1),
                             peak_reserved_mb=round(measured["peak_reserved_bytes"] / 2**20, 1))
            else:
                entry["peak_metered_mb"] = round(measured["peak_bytes"] / 2**20, 3)
        except SectionProblem as exc:
            entry = {"error": str(exc)[-800:]}
            # a CUDA error is reported at a later call than the kernel that caused it: run the step once more
            # with every launch synchronous, so that the trace names the failing kernel
            if ctx.device == "cuda" and "illegal memory access" in str(exc) and ctx.left() > 60:
                entry["launch_blocking"] = _launch_blocking_trace(cmd, ctx, family)
            problems.append(f"{family}: {exc}"[:300])
        result["families"][family] = entry
        ctx.save(result)
    for family in args:
        entry = result["families"][family]
        if plan["tiny"]:
            estimate = flow_memory.estimate(family, tiny[family]["config"], batch=plan["batch_size"],
                                            rank=plan["rank"], fake_rank=plan["fake_rank"], precision="bf16",
                                            image_size=tiny[family]["image_size"])
        else:  # started by the check's first process when the check began (start_flow_estimates)
            estimate, problem = _wait_for_estimate(Path(ctx.scratch) / ESTIMATES_FOLDER, family, ctx)
            if problem:
                entry["estimate_error"] = problem
                continue
        entry["estimate_peak_mb"] = round(estimate["peak_bytes"] / 2**20, 1 if ctx.device == "cuda" else 3)
        entry["estimate_step_s_at_40pct"] = round(flow_memory.step_seconds(estimate["flops"]), 3)
        measured_mb = entry.get("peak_allocated_mb", entry.get("peak_metered_mb"))
        if measured_mb:
            entry["measured_over_estimate"] = round(measured_mb / entry["estimate_peak_mb"], 3)
        ctx.save(result)
    result["problems"] = problems
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _launch_blocking_trace(cmd: list[str], ctx: Context, family: str) -> str:
    """The failing step once more under ``CUDA_LAUNCH_BLOCKING=1``: where its first traceback ends (the last
    frames and the error), or that it passed that way (then the failure depends on how the kernels overlap)."""
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ctx.left())
    except subprocess.TimeoutExpired:
        return f"the {family} step with CUDA_LAUNCH_BLOCKING=1 did not finish within the section's time budget"
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode == 0:
        return "passed with CUDA_LAUNCH_BLOCKING=1"
    return first_traceback_end(done.stderr)


def first_traceback_end(stderr: str, frames: int = 4) -> str:
    """The last ``frames`` frames of the first traceback in ``stderr`` and its error line (where it was raised;
    a chained second traceback, "During handling of the above exception", follows it and is left out)."""
    lines = stderr.splitlines()
    end = next((i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), len(lines) - 1)
    starts = [i for i, line in enumerate(lines[:end]) if line.startswith("  File ")]
    start = starts[-frames] if len(starts) >= frames else 0
    return "\n".join(lines[start:end + 1])[-2000:]


SECTION_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": section_environment, "cuda_tests": section_cuda_tests, "probe": section_probe,
    "vsd_step": section_vsd_step, "real_run": section_real_run, "pixart": section_pixart,
    "flow_families": section_flow_families,
}


# ------------------------------------------------------------------------------------------ the parent
def run_section(name: str, ctx: Context, budget: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one section in its own process group under ``budget`` seconds; never raises.

    Returns the section's numbers with ``status`` (ok, failed or timeout), ``seconds`` and, when it did not
    finish cleanly, ``error`` (the last lines it wrote to stderr).
    """
    result_path = Path(ctx.scratch) / f"section-{name}.json"
    with contextlib.suppress(OSError):  # an old result must not be read as this run's; a bad scratch shows below
        result_path.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--size", ctx.size, "--device",
           ctx.device, "--scratch", ctx.scratch, "--deadline", str(time.time() + budget), "--result", str(result_path)]
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n===== {name} (budget {budget:.0f} s) =====\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=budget + 5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = round(time.perf_counter() - started, 1)
    killed = proc.returncode == -signal.SIGKILL
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("status") == "partial":  # stopped between two stages: keep what it had measured
            result["status"] = "timeout" if killed else "failed"
            result["error"] = (f"stopped after its time budget of {budget:.0f} s" if killed else _log_tail(log))
    else:
        result = {"status": "timeout" if killed else "failed",
                  "error": _log_tail(log) or f"exit code {proc.returncode}"}
        if result["status"] == "timeout":
            result["error"] = f"stopped after its time budget of {budget:.0f} s"
    result["seconds"] = seconds
    result["budget_s"] = round(budget)
    return result


def _log_tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(text[-lines:])


def section_child(args: argparse.Namespace) -> None:
    """Inside a section's process: run it, and write its numbers (or its error) where the parent looks."""
    ctx = Context(size=args.size, device=args.device, scratch=args.scratch, deadline=args.deadline,
                  result_path=args.result)
    try:
        result = SECTION_FUNCTIONS[args.section](ctx)
        result["status"] = "failed" if result.get("problems") else "ok"
    except SectionProblem as exc:
        result = {**ctx.last, "status": "timeout" if "time budget" in str(exc) else "failed", "error": str(exc)}
    except subprocess.TimeoutExpired as exc:
        result = {**ctx.last, "status": "timeout",
                  "error": f"{Path(str(exc.cmd[0])).name} ... did not finish within the section's time budget"}
    except SystemExit as exc:  # the benchmark scripts' workers stop with sys.exit(message)
        result = {**ctx.last, "status": "failed", "error": str(exc.code)[:2000]}
    except Exception as exc:  # any other failure is recorded too: the check goes on with the next section
        import traceback

        traceback.print_exc()
        result = {**ctx.last, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))


def prepare_environment(scratch: Path, wheels: Path | None, install: bool) -> dict[str, str]:
    """The environment of every section: the working tree first on PYTHONPATH, then (optionally) the given
    wheels and the project installed from the working tree into ``scratch/site`` (console scripts in its bin/)."""
    env = dict(os.environ)
    site = scratch / "site"
    paths = [str(ROOT)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(site)]
    # one pip call for the wheels and the project: a second call into the same --target leaves its bin/ alone
    # (pip only warns that the folder exists), and the project's console scripts would be missing
    targets = sorted(str(p) for p in Path(wheels).glob("*.whl")) if wheels is not None else []
    if install:
        # setuptools builds in the tree (build/, wadi.egg-info/): leave the tree as it was
        left_alone = [ROOT / name for name in ("build", "wadi.egg-info") if not (ROOT / name).exists()]
        subprocess.run(pip + ["--no-build-isolation"] + targets + [str(ROOT)], check=True)
        for path in left_alone:
            shutil.rmtree(path, ignore_errors=True)
        env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
    elif targets:
        subprocess.run(pip + targets, check=True)
    if wheels is not None or install:
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _steps(spread: dict[str, float] | None) -> str:
    if not spread:
        return "—"
    return f"{spread['median']:.3g} s (min {spread['min']:.3g}, max {spread['max']:.3g}, n={spread['n']})"


def render_markdown(report: dict[str, Any]) -> str:
    """The human summary: one short block per section, each number with its spread or rounding reference."""
    env = report["sections"].get("environment", {})
    tiny = report["size"] == "tiny"
    lines = [f"# gpu_check ({report['size']}, device {report['device']})", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}; total {report['total_s']} s "
             f"(limit {report['time_limit_s']} s)",
             f"- machine: {env.get('gpu') or 'no GPU'}, {env.get('cpu_count', '?')} CPUs, torch "
             f"{(env.get('packages') or {}).get('torch')}, CUDA {env.get('torch_cuda')}, diffusers "
             f"{(env.get('packages') or {}).get('diffusers')}, commit {env.get('commit')}", "",
             "| section | status | seconds (budget) |", "|---|---|---|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']} ({sec['budget_s']}) |")
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}: {sec['status']}"]
        if sec.get("error"):
            lines += ["", "```", str(sec["error"])[-1500:], "```"]
            measured = [k for k in sec if k not in ("status", "error", "seconds", "budget_s")]
            if measured:
                lines.append(f"Measured before it stopped (in the JSON): {', '.join(measured)}.")
        for problem in sec.get("problems", []):
            lines.append(f"- problem: {problem}")
        if sec["status"] not in ("ok", "failed") or "error" in sec:
            continue
        lines.append("")
        if name == "cuda_tests":
            lines.append(f"`{sec['command']}`: {sec['summary']}")
            lines += [f"- skipped: {r}" for r in sec.get("skip_reasons", [])]
            lines += [f"- not collected: {r}" for r in sec.get("collection_errors", [])]
        elif name == "probe":
            agree = sec["cpu_agreement"]
            lines += [f"{sec['pair']}, {sec['files_gb']} GB on disk (pair built in {sec['build_s']} s), page cache "
                      f"{sec['page_cache'].split(' ')[0]}.", "",
                      "| run | read + compute s | process s | peak GPU MB | peak host RSS MB |", "|---|---|---|---|---|"]
            for mode in ("probe", "probe-nospectra"):
                r = sec[mode]
                lines.append(f"| `compare({'' if mode == 'probe' else 'spectra=False'})` | {_fmt(r.get('seconds'))} | "
                             f"{_fmt(r.get('process_seconds'))} | {_fmt(r.get('peak_gpu_mb'), 5)} | {_fmt(r.get('peak_rss_mb'), 5)} |")
            lines += ["", f"Against the CPU on {len(agree['layers'])} layers (every numeric field of the report): "
                      f"largest absolute difference {_fmt(agree['max_abs_diff_all_fields'])} "
                      f"({agree['max_abs_diff_field'] or 'every field equal'}), largest relative {_fmt(agree['max_rel_diff_all_fields'])}; "
                      f"fp32 rounding unit {FP32_EPS:.2g}. Full run vs CPU: "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in agree["max_abs_diff_full_run_vs_cpu"].items()) + ".",
                      f"Target ≤ 10 s for the full analysis: {'met' if sec['targets']['probe_full_analysis_le_10_s'] else 'not met'}"
                      + (" (the target is for the SD1.5 pair on a GPU)." if tiny else ".")]
        elif name == "vsd_step":
            lines += [f"UNet `{sec['config']}`, batch {sec['batch_size']}, student rank {sec['rank']}, fake rank "
                      f"{sec['fake_rank']}; step time median (min, max) over the timed steps.", "",
                      "| precision | paper-style step | ours step | time ratio | paper-style peak MB | ours peak MB | memory ratio |",
                      "|---|---|---|---|---|---|---|"]
            for precision, e in sec["precisions"].items():
                lines.append(f"| {precision} | {_steps(e['paper']['step_s'])} | {_steps(e['ours']['step_s'])} | "
                             f"{e['time_ratio']:.2f}× | {e['paper']['peak_mb']} | {e['ours']['peak_mb']} | "
                             f"{e['memory_ratio']:.2f}× |")
            lines += ["", "Peak memory: " + next(iter(sec["precisions"].values()))["peak_memory"] + ". Targets "
                      "(time ≤ 0.7×, memory ≤ 0.6×): " + "; ".join(
                          f"{p} time {'met' if e['targets']['time_ratio_le_0.7'] else 'not met'}, memory "
                          f"{'met' if e['targets']['memory_ratio_le_0.6'] else 'not met'}" for p, e in sec["precisions"].items())
                      + (" (the targets are for SD1.5 on a GPU; at this size convolutions dominate the step)." if tiny else ".")]
            profiled = [(p, v, e[v]["profile"]) for p, e in sec["precisions"].items() for v in ("paper", "ours")
                        if e[v].get("profile")]
            if profiled:
                lines += ["", "One more step of each under torch's profiler (its wall time includes the profiler's "
                          "own cost): a device busy for much less than the step is waiting on the host.", "",
                          "| precision | loop | wall ms | device busy ms | kernel launches | aten calls | top host operators (ms) |",
                          "|---|---|---|---|---|---|---|"]
                for precision, variant, prof in profiled:
                    busy = prof.get("device_busy_s")
                    top = ", ".join(f"{k} {ms}" for k, ms, _ in prof["top_host"][:4]).replace("|", "/")
                    lines.append(f"| {precision} | {variant} | {prof['wall_s_under_profiler'] * 1000:.1f} | "
                                 f"{_fmt(None if busy is None else busy * 1000, 4)} | {_fmt(prof.get('kernel_launches'))} | "
                                 f"{prof['aten_calls']} | {top} |")
        elif name in ("real_run", "pixart"):
            runs = ({"checkpointing on": sec["checkpointing_on"], "checkpointing off": sec["checkpointing_off"],
                     "resumed": sec["resumed"], "resumed again": sec["resumed_again"]}
                    if name == "real_run" else {"run": sec["run"]})
            lines += [f"{sec['pipeline']} (built in {sec['build_s']} s).", "",
                      "| run | s/step median (min, max, n) | wall s | peak GPU allocated MB | peak GPU reserved MB | peak host RSS MB |",
                      "|---|---|---|---|---|---|"]
            for label, r in runs.items():
                lines.append(f"| {label} | {_steps(r.get('s_per_step'))} | {r['wall_s']} | "
                             f"{_fmt(r.get('peak_gpu_allocated_mb'), 6)} | {_fmt(r.get('peak_gpu_reserved_mb'), 6)} | "
                             f"{_fmt(r.get('peak_rss_mb'), 6)} |")
            lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in runs.values())]
            if name == "real_run":
                rc, ex = sec["resume_check"], sec["export_check"]
                lines += ["", f"Resumed from {rc['resumed_from']} in another folder, compared at {rc['compared']}: "
                          + ", ".join(f"{k} {rc[k].get('tensors_differing', '?')} of {rc[k].get('tensors', '?')} tensors differ "
                                      f"(max {_fmt(rc[k].get('max_abs_diff'))})" for k in ("student", "fake", "merged_export"))
                          + " — bit-identical means 0. Two resumes from the same checkpoint (the device's own "
                          "nondeterminism): " + ", ".join(
                              f"{k.split('_')[-1]} {rc[k].get('tensors_differing', '?')} differ (max "
                              f"{_fmt(rc[k].get('max_abs_diff'))})" for k in ("two_resumes_student", "two_resumes_fake")) + ".",
                          f"Merged export ({ex['file_gb']} GB) loaded back: keys as the teacher's {_fmt(ex['keys_as_teacher'])}, "
                          f"output vs teacher + adapter: max |Δ| {_fmt(ex['max_abs_diff_vs_adapter'])} on outputs up to "
                          f"{_fmt(ex['output_max_abs'])} (relative {_fmt(ex['relative_diff'])}; fp32 rounding unit {FP32_EPS:.2g})."]
                if "checkpointing_time_ratio" in sec:
                    lines.append(f"Checkpointing on / off: step time {sec['checkpointing_time_ratio']:.2f}×"
                                 + (f", peak GPU memory {sec['checkpointing_memory_ratio']:.2f}×" if "checkpointing_memory_ratio" in sec else "") + ".")
                if "targets" in sec:
                    lines.append("Batch 8, fp16, checkpointing on, within a 24 GB card (reserved < 23 GiB): "
                                 + ("met" if sec["targets"]["batch8_fp16_checkpointing_fits_24_gb"] else "not met") + ".")
        elif name == "flow_families":
            cuda = report["device"] == "cuda"
            lines += [f"One VSD step, batch {sec['batch_size']}, student rank {sec['rank']}, fake rank "
                      f"{sec['fake_rank']}, bf16, gradient checkpointing; the estimate is `flow_memory.py`'s "
                      "fake-tensor count.", "",
                      "| family | denoiser | step | peak allocated MB | peak reserved MB | estimated peak MB | "
                      "measured / estimate | estimated step (40 % of 989 TFLOP/s) |", "|---|---|---|---|---|---|---|---|"]
            for family, e in sec["families"].items():
                if "error" in e:
                    first = next((ln for ln in e["error"].splitlines() if "Error" in ln), e["error"].splitlines()[0])
                    lines.append(f"| {family} | failed: {first.strip()[-200:].replace('|', '/')} | | | | | | |")
                    continue
                peak = e.get("peak_allocated_mb", e.get("peak_metered_mb"))
                lines.append(f"| {family} | {e['class']} ({e['config']}) | {_steps(e.get('step_s'))} | {_fmt(peak, 6)} | "
                             f"{_fmt(e.get('peak_reserved_mb'), 6)} | {_fmt(e.get('estimate_peak_mb'), 6)} | "
                             f"{_fmt(e.get('measured_over_estimate'))} | {_fmt(e.get('estimate_step_s_at_40pct'))} s |")
            for family, e in sec["families"].items():
                if "estimate_error" in e:
                    lines += ["", f"{family}: no estimate ({e['estimate_error'].strip().splitlines()[-1][-200:]})."]
                if "launch_blocking" in e:
                    lines += ["", f"{family}, the failing step again with `CUDA_LAUNCH_BLOCKING=1`:", "", "```",
                              e["launch_blocking"], "```"]
            if not cuda:
                lines += ["", "On a CPU the peak is the metered real step's (tensor bytes), which must equal the estimate."]
        elif name == "environment":
            lines.append(", ".join(f"{k} {v}" for k, v in (sec.get("packages") or {}).items()))
            lines.append(f"wadi imported from {sec.get('wadi_imported_from')}; wadi-distill: {sec.get('wadi_distill_command')}")
    return "\n".join(lines) + "\n"


def parse_budgets(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """``SECTION=SECONDS`` items as a dict; a malformed one stops the check (exit 2) before anything runs."""
    budgets = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if name not in SECTIONS or not seconds > 0:
            parser.error(f"--budget takes SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)} and a positive "
                         f"number of seconds, not {item!r}")
        budgets[name] = seconds
    return budgets


def rest_command(argv: list[str], rest: list[str]) -> str:
    """The command that runs the sections in ``rest`` alone: this one's arguments without ``--only`` and with its
    own ``--out`` folder (``OUT-rest``), so that the first results are kept."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--only", "--out"):
            skip = True
            if arg == "--out" and i + 1 < len(argv):
                kept += ["--out", argv[i + 1].rstrip("/") + "-rest"]
            continue
        if arg.startswith("--only="):
            continue
        if arg.startswith("--out="):
            kept.append(arg.rstrip("/") + "-rest")
            continue
        kept.append(arg)
    sections = ["environment"] + [name for name in rest if name != "environment"]
    return " ".join(["python", "benchmarks/gpu_check.py", *map(shlex.quote, kept), "--only", ",".join(sections)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PLANS), default="sd15", help="sd15 (the real sizes) or tiny (CPU).")
    parser.add_argument("--out", type=Path, help="Folder for gpu_check.json, gpu_check.md and gpu_check.log.")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--only", help="Comma-separated sections to run (default: all).")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="Override one section's time budget (repeatable).")
    parser.add_argument("--time-limit", type=float, help="Seconds for the whole check (default: 540 at sd15).")
    parser.add_argument("--wheels", type=Path, help="Install the .whl files in this folder first (no index, no deps).")
    parser.add_argument("--install", action="store_true", help="Install the project from this working tree first.")
    parser.add_argument("--scratch", help="Scratch folder (default: a temporary one, deleted at the end).")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        section_child(args)
        return 0
    if args.out is None:
        parser.error("--out is required")
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    budgets = {**PLANS[args.size]["budgets"], **parse_budgets(parser, args.budget)}
    if args.wheels is not None and not sorted(args.wheels.glob("*.whl")):
        parser.error(f"--wheels {args.wheels}: no .whl files there")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU")
    if device == "cpu" and args.size != "tiny":
        parser.error("the sd15 size needs a GPU (it would run for hours on a CPU); use --size tiny on a CPU")
    limit = args.time_limit or PLANS[args.size]["time_limit"]
    args.out.mkdir(parents=True, exist_ok=True)
    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="wadi-gpu-check-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    log.write_text("")
    started = time.perf_counter()
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"size": args.size, "device": device, "command": command,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "time_limit_s": limit,
                              "plan": {k: v for k, v in PLANS[args.size].items() if k != "budgets"}, "sections": {}}
    estimates: list[subprocess.Popen] = []
    try:
        try:
            env = prepare_environment(scratch, args.wheels, args.install)
        except subprocess.CalledProcessError as exc:
            print(f"error: installing {'the wheels' if '.whl' in ' '.join(exc.cmd) else 'the project'} failed "
                  f"(exit code {exc.returncode}); pip's message is above.", file=sys.stderr)
            return 2
        if device == "cpu":
            # one thread per process: on a shared CPU, OpenMP threads waiting for each other make the tiny
            # models' steps 10-30x slower (measured: 30 s against 1.3 s per step); the GPU run is unaffected
            env.setdefault("OMP_NUM_THREADS", "1")
        flow_plan = PLANS[args.size]["flow_families"]
        if "flow_families" in only and not flow_plan["tiny"]:
            estimates = start_flow_estimates(flow_plan, scratch, env)
        for name in only:
            left = limit - (time.perf_counter() - started)
            if left < 5:
                report["sections"][name] = {"status": "skipped", "error": "the check's time limit was reached",
                                            "seconds": 0, "budget_s": 0}
            else:
                budget = min(budgets[name], left)
                report["sections"][name] = run_section(name, Context(args.size, device, str(scratch), 0), budget, log, env)
            sec = report["sections"][name]
            print(f"{name:12s} {sec['status']:8s} {sec['seconds']:7.1f} s", flush=True)
            write_outputs(report, args.out, started)
    finally:
        for proc in estimates:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    write_outputs(report, args.out, started)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    rest = [name for name, sec in report["sections"].items() if sec["status"] in ("skipped", "timeout")]
    if rest:
        print(f"not run or cut short: {', '.join(rest)}; they run alone with: "
              f"{rest_command(argv if argv is not None else sys.argv[1:], rest)}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


def write_outputs(report: dict[str, Any], out: Path, started: float) -> None:
    """Write the JSON and the Markdown (after every section, so a killed check still leaves what it measured)."""
    report["total_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(report))


if __name__ == "__main__":
    sys.exit(main())
