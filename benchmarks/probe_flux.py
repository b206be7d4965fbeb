"""`wadi-probe compare` on a Flux.1-width pair: a diffusers teacher folder against a student in Flux's original layout.

The pair is built from random weights (nothing is downloaded) at Flux.1's real width — inner dimension 3072
(24 heads × 128), MLP 12288, T5 context 4096, pooled 768, 64 latent channels, guidance embedding as in
Flux.1-dev — with one double block and one single block (Flux.1 has 19 and 38), stored in bf16 as released:

* teacher: ``teacher/transformer/`` (``diffusion_pytorch_model.safetensors`` + ``config.json``), diffusers names;
* student: ``student-flux-original.safetensors`` in Black Forest Labs' layout (``double_blocks.0.img_attn.qkv``,
  ``single_blocks.0.linear1`` …, q/k/v and the MLP input fused), written from the student's diffusers tensors by
  the test suite's independent writer (``tests/_flow_layouts.py``);
* the change: each Linear of the blocks is rotated by a low-rank LoRaD angle field Θ = A·B (norms kept exactly),
  with a rank set per layer type — image attention 4, text attention 8, image feed-forward 16, text
  feed-forward 8, single-block attention 4, MLP input 16, joint output 12 — and entries of Θ of standard
  deviation 0.03 rad; the modulation Linears, the embeddings and the output layers are left untouched.

Then ``wadi-probe compare`` runs in a subprocess (its wall time and peak RSS are measured) and the planted ranks
are set beside the ranks the report advises.

Usage::

    python benchmarks/probe_flux.py                 # build (≈ 1.1 GB per file in benchmarks/.cache/) and compare
    python benchmarks/probe_flux.py --build-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "flux-width"
sys.path.insert(0, str(ROOT / "tests"))  # the independent diffusers -> original-layout writer lives with the tests

FLUX_WIDTH_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# planted rank of the angle field per layer type (wadi_probe.layers.layer_type_of) and block kind
PLANTED_RANKS = {("transformer", "attention"): 4, ("transformer", "attention (text)"): 8,
                 ("transformer", "feed-forward"): 16, ("transformer", "feed-forward (text)"): 8,
                 ("single", "attention"): 4, ("single", "feed-forward"): 16,
                 ("single", "attention + feed-forward"): 12}
ANGLE_STD = 0.03  # radians, the standard deviation of Θ's entries


def planted_rank(name: str, shape: tuple[int, ...]) -> int | None:
    """The rank planted in one tensor, or None when it is left untouched."""
    from wadi_probe.layers import block_of, kind_of, layer_type_of

    if kind_of(name, shape) != "linear":
        return None
    return PLANTED_RANKS.get((block_of(name).split(".")[0], layer_type_of(name, shape)))


def build_pair(cache: Path, seed: int) -> tuple[Path, Path]:
    """Write the teacher folder and the original-layout student (cached)."""
    teacher_dir, student_path = cache / "teacher", cache / "student-flux-original.safetensors"
    if (teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors").exists() and student_path.exists():
        return teacher_dir, student_path
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from _flow_layouts import flux_original
    from wadi_probe.rotation import rotate_pairs

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_WIDTH_CONFIG)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    (teacher_dir / "transformer").mkdir(parents=True, exist_ok=True)
    model.save_config(teacher_dir / "transformer")
    gen = torch.Generator().manual_seed(seed)
    teacher: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".bias"):
            value = 0.01 * torch.randn(shape, generator=gen)
        else:  # norm scales
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        teacher[name] = value.to(torch.bfloat16)
    save_file(teacher, str(teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    student: dict[str, torch.Tensor] = {}
    for name, value in teacher.items():
        rank = planted_rank(name, tuple(value.shape))
        if rank is None:
            student[name] = value
            continue
        out, fan_in = value.shape
        theta = (torch.randn(out, rank, generator=gen) @ torch.randn(rank, fan_in // 2, generator=gen)) * (
            ANGLE_STD / math.sqrt(rank))
        student[name] = rotate_pairs(value.float(), theta).to(torch.bfloat16)
    del teacher
    save_file(flux_original(student), str(student_path))
    return teacher_dir, student_path


def run_compare(teacher: Path, student: Path, out: Path) -> tuple[str, float, float]:
    """``wadi-probe compare`` in a subprocess: (its output, wall seconds, peak RSS MiB)."""
    # run inside the cache folder with relative names, so the output shows no machine-specific paths
    command = [sys.executable, "-c", "from wadi_probe.cli import main; main()", "compare",
               os.path.relpath(teacher, out), os.path.relpath(student, out), "-o", "report.json", "--csv", "layers.csv",
               "--top", "6", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "110"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=out)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"compare failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result.stdout, wall, rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    teacher, student = build_pair(args.cache, args.seed)
    print(f"pair built in {time.perf_counter() - start:.0f} s: {teacher.name}/transformer, {student.name}")
    if args.build_only:
        return
    output, wall, rss = run_compare(teacher, student, args.cache)
    print("$ wadi-probe compare teacher student-flux-original.safetensors -o report.json --csv layers.csv --top 6 "
          "--no-progress    # in the cache folder, COLUMNS=110")
    print(output)
    report = json.loads((args.cache / "report.json").read_text())
    print(f"compare: {wall:.0f} s wall, peak RSS {rss:.0f} MiB ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, seed {args.seed})")
    print("\nplanted rank vs the report's advice (lorad_rank_90, recommended_rank) per Linear:")
    print(f"{'layer':55s} {'type':26s} planted  rank90  advised")
    for layer in report["layers"]:
        rank = planted_rank(layer["name"], tuple(layer["shape"]))
        if layer["kind"] == "linear" and rank is not None:
            print(f"{layer['module']:55s} {layer['layer_type']:26s} {rank:7d} {layer.get('lorad_rank_90')!s:>7} "
                  f"{layer.get('recommended_rank')!s:>8}")


if __name__ == "__main__":
    main()
