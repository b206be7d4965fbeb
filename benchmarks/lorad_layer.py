"""Time a LoRaD layer against the forward-hook way of applying the same rotation, and a merged layer against a plain one.

The forward-hook way (how the paper's released code adapts a layer): the original ``nn.Linear`` forward runs and
its output is thrown away; a forward hook rebuilds the rotated weight R_Θ(W) and returns ``F.linear(x, R_Θ(W))``.
:class:`wadi_distill.lorad.layer.LoRaDLinear` forms R_Θ(W) once and makes one ``F.linear`` call (and, training, forms
R_Θ(W) again in backward instead of keeping it for backward). Both run the forward
rotation with :func:`wadi_probe.rotation.rotate_pairs`, at the same rank with the same factors, and their outputs
and gradients are checked to agree before anything is timed. The LoRaD layer differentiates the rotation with its
hand-written backward (frozen base); the column "autograd rotation" times the same layer with that switched off,
so the two savings (no second forward, cheaper rotation backward) can be told apart. Times are forward+backward
with the input requiring grad (as inside a network whose earlier layers are adapted).

Shapes are SD1.5 UNet linears, (out × in) with the token count a 64×64 latent gives at that width (4096 tokens at
320 wide, 1024 at 640, 256 at 1280); the cross-attention key/value projection 320×768 is also timed on 77 text
tokens, which is what it really sees. One image per step unless ``--batch`` says otherwise.

    python benchmarks/lorad_layer.py --quick                 # CPU, token counts / 8, fewer repeats
    python benchmarks/lorad_layer.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wadi_distill.lorad.layer import LoRaDLinear, set_fused_rotation_backward
from wadi_probe.rotation import rotate_pairs

# (out, in, tokens, note)
SHAPES = [
    (320, 320, 4096, "attn q/k/v/out @ 64×64"),
    (640, 640, 1024, "attn @ 32×32"),
    (1280, 1280, 256, "attn @ 16×16"),
    (1280, 5120, 256, "ff.net.2 @ 16×16"),
    (320, 768, 4096, "320×768 @ 4096 tokens"),
    (320, 768, 77, "attn2 to_k/to_v, 77 text tokens"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class HookRotation:
    """The forward-hook way: the base layer runs, a hook recomputes the output with the rotated weight."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        self.layer = base
        self.a = nn.Parameter(a.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        base.register_forward_hook(self._hook)

    def _hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        rotated = rotate_pairs(module.weight, self.a @ self.b)  # the original ``output`` is discarded
        return F.linear(inputs[0], rotated, module.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def params(self) -> list[nn.Parameter]:
        return [self.a, self.b]


def bench_shape(out: int, fan_in: int, tokens: int, rank: int, device: torch.device, dtype: torch.dtype, repeats: int,
                batch: int = 1) -> dict:
    torch.manual_seed(0)
    plain = nn.Linear(fan_in, out).to(device, dtype).requires_grad_(False)
    lorad = LoRaDLinear(nn.Linear(fan_in, out).to(device, dtype))
    lorad.base_layer.load_state_dict(plain.state_dict())
    lorad.add_adapter("student", rank, init="random")
    lorad.set_active("student")
    with torch.no_grad():
        lorad.lorad_A["student"].normal_(0, 0.02)
    hook_base = nn.Linear(fan_in, out).to(device, dtype).requires_grad_(False)
    hook_base.load_state_dict(plain.state_dict())
    hook = HookRotation(hook_base, lorad.lorad_A["student"], lorad.lorad_B["student"])

    x = torch.randn(batch, tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, tokens, out, device=device, dtype=dtype)
    lorad_params = [lorad.lorad_A["student"], lorad.lorad_B["student"]]

    def step(module, params):
        def run():
            for p in params:
                p.grad = None
            x.grad = None
            module(x).backward(grad_out)
        return run

    # same outputs and gradients before timing
    y1, y2 = lorad(x), hook(x)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y1.float(), y2.float(), rtol=tol, atol=tol), "LoRaD and hook outputs differ"
    step(lorad, lorad_params)()
    g1 = [p.grad.clone() for p in lorad_params]
    step(hook, hook.params())()
    for a, b in zip(g1, (p.grad for p in hook.params())):
        assert torch.allclose(a.float(), b.float(), rtol=tol * 10, atol=tol * 10), "LoRaD and hook gradients differ"

    t_lorad = time_call(step(lorad, lorad_params), device, repeats)
    previous = set_fused_rotation_backward(False)  # the same layer, autograd differentiating rotate_pairs
    try:
        t_lorad_autograd = time_call(step(lorad, lorad_params), device, repeats)
    finally:
        set_fused_rotation_backward(previous)
    t_hook = time_call(step(hook, hook.params()), device, repeats)

    # merged vs plain (inference forward)
    lorad.merge()
    merged_plain = nn.Linear(fan_in, out).to(device, dtype).requires_grad_(False)
    with torch.no_grad():
        merged_plain.weight.copy_(lorad.base_layer.weight)
        merged_plain.bias.copy_(lorad.base_layer.bias)
        xi = x.detach()
        equal = bool(torch.equal(lorad(xi), merged_plain(xi)))
        t_merged = time_call(lambda: lorad(xi), device, repeats)
        t_plain = time_call(lambda: merged_plain(xi), device, repeats)
    return {
        "out": out, "in": fan_in, "tokens": tokens, "batch": batch, "rank": rank,
        "lorad_ms": t_lorad, "lorad_autograd_rotation_ms": t_lorad_autograd, "hook_ms": t_hook, "ratio": t_lorad / t_hook,
        "ratio_autograd_rotation": t_lorad_autograd / t_hook,
        "merged_ms": t_merged, "plain_ms": t_plain, "merged_over_plain": t_merged / t_plain, "merged_equals_plain": equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1, help="images per step (tokens per image as listed)")
    parser.add_argument("--quick", action="store_true", help="token counts / 8 and fewer repeats (shared CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable numbers on a shared machine; 0 keeps torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (5 if args.quick else 20)
    rows = []
    for out, fan_in, tokens, note in SHAPES:
        tokens = max(tokens // 8, 16) if args.quick and tokens > 77 else tokens
        row = bench_shape(out, fan_in, tokens, args.rank, device, dtype, repeats, args.batch)
        row["note"] = note
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\ndevice {args.device} ({name}), dtype {args.dtype}, rank {args.rank}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, repeats {repeats}{', quick' if args.quick else ''}\n")
    print("| shape (out×in) | tokens | LoRaD ms | LoRaD, autograd rotation ms | hook ms | LoRaD / hook | "
          "(autograd rotation) / hook | merged fwd ms | plain fwd ms | merged == plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
    for r in rows:
        print(f"| {r['out']}×{r['in']} ({r['note']}) | {r['tokens']} | {r['lorad_ms']:.2f} | {r['lorad_autograd_rotation_ms']:.2f} | "
              f"{r['hook_ms']:.2f} | {r['ratio']:.2f}× | {r['ratio_autograd_rotation']:.2f}× | {r['merged_ms']:.2f} | "
              f"{r['plain_ms']:.2f} | {'yes' if r['merged_equals_plain'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
