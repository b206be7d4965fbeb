"""Step time and peak memory of one VSD step: our loop vs a loop written the way the paper's code works.

- ours: :class:`wadi_distill.vsd.trainer.VSDTrainer` — ONE frozen base; student and fake score are LoRaD adapters on it
  (the teacher is the base with no adapter); each adapted layer forms its rotated weight once and runs one matmul.
- paper-style: THREE full copies of the UNet (teacher, student, fake score), the adapters attached with forward
  hooks that discard the layer's own output and run the layer again with the rotated weight (each adapted
  layer runs twice). Same VSD step (:class:`wadi_distill.vsd.step.VSDStep`), plan, batch, CFG, optimizers and precision.

Each variant runs in its own subprocess so that peak memory is measured separately (CUDA: max allocated;
CPU: peak RSS above the RSS after imports). On a CPU that peak also holds the library code pages (libtorch,
oneDNN) the first use of each kernel faults in, 25-30 MiB for either loop on the small UNet; they are reported
as ``code_bytes`` (resident file-backed memory gained during the run) and taken out in ``memory_ratio_less_code``.

    python benchmarks/vsd_step.py                                   # CPU, small UNet
    python benchmarks/vsd_step.py --config sd15 --warmup 1 --steps 2  # CPU, SD1.5 shapes (paper-style: over 15 GB RAM)
    python benchmarks/vsd_step.py --device cuda --config sd15 --batch-size 2 --mixed-precision fp16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = {
    # a small SD-shaped UNet that runs on a shared CPU in seconds
    "small": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16),
    # Stable Diffusion 1.5's UNet (random weights), 512 px -> 64x64 latents
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8),
}
TEXT_LEN = 77


def _teacher(config_name: str, device: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from wadi_distill.schedules import schedule_from_scheduler
    from wadi_distill.teachers.families import StableDiffusion
    from wadi_distill.teachers.pipeline import Conditioning, Teacher

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 860M random weights take ~10 s a process on a host CPU
        unet = UNet2DConditionModel(**CONFIGS[config_name])
    unet.requires_grad_(False)
    schedule = schedule_from_scheduler(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    dim = unet.config.cross_attention_dim

    def encode(prompts: list[str]) -> Conditioning:
        gen = torch.Generator().manual_seed(len(prompts))
        states = torch.randn(len(prompts), TEXT_LEN, dim, generator=gen)
        states[[i for i, p in enumerate(prompts) if p == ""]] = 0
        return Conditioning(states)

    size = int(unet.config.sample_size)
    return Teacher(denoiser=unet, family=StableDiffusion(size * 8, 4), schedule=schedule,
                   latent_shape=(4, size, size), source=f"random:{config_name}", encode_prompts=encode)


# ------------------------------------------------------------------------------------------ paper-style loop
class _HookRotation(nn.Module):
    """LoRaD factors attached by a forward hook: the layer's own output is discarded and recomputed."""

    def __init__(self, layer: nn.Linear, rank: int) -> None:
        super().__init__()
        out, fan_in = layer.weight.shape
        self.A = nn.Parameter(torch.zeros(out, rank, device=layer.weight.device))
        self.B = nn.Parameter(torch.empty(rank, fan_in // 2, device=layer.weight.device))
        nn.init.xavier_uniform_(self.B)

    def hook(self, module: nn.Linear, inputs, output):
        from wadi_probe.rotation import rotate_pairs

        weight = rotate_pairs(module.weight.float(), self.A @ self.B).to(module.weight.dtype)
        return F.linear(inputs[0], weight, module.bias)


def _attach(model: nn.Module, ranks: dict[str, int]) -> nn.ModuleList:
    holders = nn.ModuleList()
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        holder = _HookRotation(modules[name], rank)
        modules[name].register_forward_hook(holder.hook)
        holders.append(holder)
    return holders


def _paper_step_fn(teacher, ranks: dict[str, int], fake_ranks: dict[str, int], batch: int, cfg: float,
                   device: str, dtype: torch.dtype, sequential_cfg: bool = False):
    from wadi_distill.vsd import losses as vsd
    from wadi_distill.vsd.step import VSDStep

    base = teacher.denoiser.to(device, dtype)
    teacher_unet, student_unet, fake_unet = base, copy.deepcopy(base), copy.deepcopy(base)
    student = _attach(student_unet, ranks)
    fake = _attach(fake_unet, fake_ranks)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-4)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    schedule, call = teacher.schedule, teacher.call
    cond = teacher.encode_prompts(["x"] * batch).to(device)
    null = teacher.encode_prompts([""]).to(device)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    models = {"teacher": teacher_unet, "student": student_unet, "fake": fake_unet}

    def predict(role, x, t, c):
        with autocast:
            return call(models[role], x, t, c).float()

    # the same step as the trainer's, on three separate models
    vsd_step = VSDStep(schedule, predict, null, cfg, sequential_cfg=sequential_cfg)
    keep_prompt = torch.zeros(batch, dtype=torch.bool, device=device)

    def step() -> None:
        z = torch.randn(batch, *teacher.latent_shape, generator=gen).to(device)
        t = vsd.student_timesteps(batch, schedule, gen).to(device)
        noise = torch.randn(batch, *teacher.latent_shape, generator=gen).to(device)
        loss, x0 = vsd_step.student_loss(z, cond, t, noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt_s)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(opt_s)
        scaler.update()
        opt_s.zero_grad(set_to_none=True)
        t2 = vsd.fake_timesteps(batch, schedule, gen).to(device)
        noise2 = torch.randn(batch, *teacher.latent_shape, generator=gen).to(device)
        loss = vsd_step.fake_loss(x0.detach(), cond, t2, noise2, keep_prompt)
        scaler.scale(loss).backward()
        scaler.unscale_(opt_f)
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        scaler.step(opt_f)
        scaler.update()
        opt_f.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------ our loop
def _ours_step_fn(teacher, rank: int, fake_rank: int, batch: int, cfg: float, device: str, precision: str,
                  workdir: Path, checkpointing: bool, sequential_cfg: bool = False):
    from wadi_distill.vsd.trainer import DistillConfig, VSDTrainer

    prompts = workdir / "prompts.txt"
    prompts.write_text("x\n" * 8)
    config = DistillConfig(teacher=teacher.source, output_dir=str(workdir / "out"), prompts=str(prompts), rank=rank,
                           fake_rank=fake_rank, batch_size=batch, cfg=cfg, device=device, mixed_precision=precision,
                           progress=False, tensorboard=False, gradient_checkpointing=checkpointing,
                           sequential_cfg=sequential_cfg)
    trainer = VSDTrainer(config, teacher=teacher)
    return trainer.train_step


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``RssFile``, ``VmHWM``, ...) in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _file_backed_rss() -> int:
    """Resident file-backed memory of this process in bytes (library code pages; 0 where /proc is missing)."""
    return _proc_status_bytes("RssFile") or 0


def _peak_rss() -> int:
    """This process's peak resident memory in bytes.

    /proc's VmHWM belongs to the process's own address space, which exec starts afresh; ``ru_maxrss`` is kept
    across fork and exec, so a worker started by a large parent (a long pytest session) would report the parent's
    peak and hide its own. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(args: argparse.Namespace) -> dict:
    from diffusers import UNet2DConditionModel  # noqa: F401  (imports before the memory baseline)

    import wadi_distill.vsd.trainer  # noqa: F401
    from wadi_distill.plan import plan_from_preset

    torch.set_num_threads(args.threads)
    rss0 = _peak_rss()
    file0 = _file_backed_rss()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    teacher = _teacher(args.config, args.device)
    ranks = plan_from_preset(teacher.denoiser, args.rank, "paper").ranks()
    fake_ranks = plan_from_preset(teacher.denoiser, args.fake_rank, "paper").ranks()
    with tempfile.TemporaryDirectory() as tmp:
        if args.variant == "ours":
            step = _ours_step_fn(teacher, args.rank, args.fake_rank, args.batch_size, args.cfg, args.device,
                                 args.mixed_precision, Path(tmp), args.gradient_checkpointing, args.sequential_cfg)
        else:
            step = _paper_step_fn(teacher, ranks, fake_ranks, args.batch_size, args.cfg, args.device, dtype,
                                  args.sequential_cfg)
        cuda = args.device == "cuda"
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if cuda else
                _peak_rss() - rss0)
        profiled = _profile_step(step, cuda) if args.profile else None
    result = {"variant": args.variant, "median_step_s": statistics.median(times), "step_s": times,
              "peak_bytes": int(peak), "code_bytes": 0 if cuda else _file_backed_rss() - file0,
              "adapted_layers": len(ranks)}
    if profiled is not None:
        result["profile"] = profiled
    return result


def _profile_step(step, cuda: bool, top: int = 12) -> dict:
    """One more step under torch's profiler: where its time goes (after the timed steps and the memory peak).

    On a GPU a step whose kernels keep the device busy for much less than the step's wall time is bound by the
    host (Python, dispatch, kernel launches), not by the device's arithmetic; the launch and operator counts say
    how many calls the host made.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    by_device = sorted(events, key=lambda e: -e.self_device_time_total)[:top] if cuda else []
    by_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "wall_s_under_profiler": wall,
        "device_busy_s": sum(e.self_device_time_total for e in events) / 1e6 if cuda else None,
        "kernel_launches": sum(e.count for e in events if "LaunchKernel" in e.key) if cuda else None,
        "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
        "top_device": [[e.key[:80], round(e.self_device_time_total / 1e3, 2), e.count] for e in by_device],
        "top_host": [[e.key[:80], round(e.self_cpu_time_total / 1e3, 2), e.count] for e in by_host],
    }


def compare_variants(*, device: str = "cpu", config: str = "small", batch_size: int = 1, rank: int | None = None,
                     fake_rank: int | None = None, cfg: float = 1.5, mixed_precision: str = "no",
                     gradient_checkpointing: bool = False, sequential_cfg: bool = False, steps: int = 5,
                     warmup: int = 2, threads: int = 1,
                     timeout: float | None = None, parallel: bool = False, profile: bool = False) -> dict:
    """Time the paper-style step and ours, each in its own process; their step times, peak memory and ratios.

    ``rank``/``fake_rank`` default to 8/4 on the small UNet and to the paper's 256/32 on SD1.5. Peak memory is
    CUDA's max allocated on a GPU and the peak RSS above the imports on a CPU. ``parallel`` runs both processes
    at once (for memory only: the step times then share the machine). Raises RuntimeError (with the failing
    variant's stderr) when a variant fails.
    """
    rank = rank if rank is not None else (256 if config == "sd15" else 8)
    fake_rank = fake_rank if fake_rank is not None else (32 if config == "sd15" else 4)
    flags = ["--device", device, "--config", config, "--batch-size", str(batch_size), "--rank", str(rank),
             "--fake-rank", str(fake_rank), "--cfg", str(cfg), "--mixed-precision", mixed_precision,
             "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    if gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if sequential_cfg:  # both loops: the guided passes' two halves one after the other
        flags.append("--sequential-cfg")
    if profile:
        flags.append("--profile")
    root = str(Path(__file__).resolve().parents[1])  # the workers import this checkout's packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    results: dict = {}
    commands = {variant: [sys.executable, str(Path(__file__).resolve()), "--variant", variant, *flags]
                for variant in ("paper", "ours")}
    if parallel:  # both at once: each process's own peak is unaffected, its step time is not comparable
        with tempfile.TemporaryDirectory() as tmp:
            logs = {v: (open(Path(tmp) / f"{v}.out", "w+"), open(Path(tmp) / f"{v}.err", "w+")) for v in commands}
            procs = {v: subprocess.Popen(cmd, stdout=logs[v][0], stderr=logs[v][1], text=True, env=env)
                     for v, cmd in commands.items()}
            try:
                for variant, proc in procs.items():
                    proc.wait(timeout=timeout)
            finally:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            done = {}
            for variant, (out, err) in logs.items():
                out.seek(0), err.seek(0)
                done[variant] = subprocess.CompletedProcess(commands[variant], procs[variant].returncode, out.read(),
                                                            err.read())
                out.close(), err.close()
    else:
        done = {variant: subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
                for variant, cmd in commands.items()}
    for variant, finished in done.items():
        if finished.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{finished.stderr[-4000:]}")
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "config": config,
        "batch_size": batch_size, "mixed_precision": mixed_precision, "rank": rank, "fake_rank": fake_rank,
        "gradient_checkpointing": gradient_checkpointing, "sequential_cfg": sequential_cfg, "steps": steps,
        "warmup": warmup,
        "peak_memory": "CUDA max allocated" if device == "cuda" else "peak RSS above the imports",
        **results,
        "time_ratio": results["ours"]["median_step_s"] / results["paper"]["median_step_s"],
        "memory_ratio": results["ours"]["peak_bytes"] / max(1, results["paper"]["peak_bytes"]),
        "memory_ratio_less_code": _less_code(results["ours"]) / max(1, _less_code(results["paper"])),
    }


def _less_code(result: dict) -> int:
    """Peak memory less the library code pages the worker faulted in (on a CPU; CUDA peaks hold none)."""
    return result["peak_bytes"] - result.get("code_bytes", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=None, help="student rank (default 8 small, 256 sd15)")
    parser.add_argument("--fake-rank", type=int, default=None, help="fake-score rank (default 4 small, 32 sd15)")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--sequential-cfg", action="store_true",
                        help="both loops: the guided passes' conditional and null halves one after the other")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="one more step of each under torch's profiler: device busy time, launches, top operators")
    parser.add_argument("--variant", choices=["ours", "paper"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is None:
        args.rank = 256 if args.config == "sd15" else 8
    if args.fake_rank is None:
        args.fake_rank = 32 if args.config == "sd15" else 4
    if args.variant:
        print(json.dumps(_worker(args)))
        return
    try:
        results = compare_variants(device=args.device, config=args.config, batch_size=args.batch_size, rank=args.rank,
                                   fake_rank=args.fake_rank, cfg=args.cfg, mixed_precision=args.mixed_precision,
                                   gradient_checkpointing=args.gradient_checkpointing,
                                   sequential_cfg=args.sequential_cfg, steps=args.steps,
                                   warmup=args.warmup, threads=args.threads, profile=args.profile)
    except RuntimeError as exc:
        sys.exit(str(exc))
    print(f"device {results['device']}, config {args.config}, batch {args.batch_size}, precision {args.mixed_precision}, "
          f"student rank {args.rank}, fake rank {args.fake_rank}, {results['ours']['adapted_layers']} adapted layers, "
          f"median of {args.steps} steps" + (", guided passes sequential" if args.sequential_cfg else ""))
    for variant in ("paper", "ours"):
        r = results[variant]
        print(f"  {variant:6s} step {r['median_step_s'] * 1000:9.1f} ms   peak memory {r['peak_bytes'] / 2**20:9.1f} MiB"
              f"   code pages {r['code_bytes'] / 2**20:6.1f} MiB")
    for variant in ("paper", "ours") if args.profile else ():
        prof = results[variant]["profile"]
        busy = (f", device busy {prof['device_busy_s'] * 1000:.1f} ms, {prof['kernel_launches']} kernel launches"
                if prof["device_busy_s"] is not None else "")
        print(f"  {variant:6s} profiled step {prof['wall_s_under_profiler'] * 1000:.1f} ms{busy}, "
              f"{prof['aten_calls']} aten calls")
    print(f"  ours / paper-style: step time {results['time_ratio']:.2f}x, peak memory {results['memory_ratio']:.2f}x"
          + (f" ({results['memory_ratio_less_code']:.2f}x less code pages)" if args.device == "cpu" else ""))


if __name__ == "__main__":
    main()
