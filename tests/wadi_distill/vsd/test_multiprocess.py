"""Two CPU processes (gloo) train together: both end with identical adapters, only rank 0 writes files and loads
the text encoders, and the run matches one process with the same global batch (weights and logged losses)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

WORKER = textwrap.dedent("""
    import builtins, json, os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import wadi_distill.vsd.trainer as trainer_module
    from wadi_distill.vsd.trainer import DistillConfig, distill

    loads = []
    real_load = trainer_module.load_teacher

    def load_teacher(*a, **k):
        loads.append(bool(k.get("load_text_encoders", True)))
        return real_load(*a, **k)

    trainer_module.load_teacher = load_teacher

    cfg = DistillConfig(**json.loads(sys.argv[1]))
    rank = int(os.environ["RANK"])
    out = os.path.abspath(cfg.output_dir)
    writes = []
    real_open, real_replace, real_mkdir = builtins.open, os.replace, os.mkdir

    def inside(path):
        return os.path.abspath(os.fspath(path)).startswith(out)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            writes.append(("open", os.fspath(file)))
        return real_open(file, mode, *a, **k)

    def replace_(src, dst, *a, **k):
        if inside(dst):
            writes.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    def mkdir_(path, *a, **k):
        if inside(path):
            writes.append(("mkdir", os.fspath(path)))
        return real_mkdir(path, *a, **k)

    builtins.open, os.replace, os.mkdir = open_, replace_, mkdir_
    result = distill(cfg)
    builtins.open, os.replace, os.mkdir = real_open, real_replace, real_mkdir
    report = os.path.join(os.path.dirname(out), f"rank{rank}")
    save_file(result.student_state, report + ".safetensors")
    save_file(result.fake_state, report + "-fake.safetensors")
    with open(report + ".json", "w") as handle:
        json.dump({"writes": writes, "steps": result.steps, "text_encoders": loads}, handle)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "flux", "sd3"])
def test_two_processes_identical_adapters_rank0_writes(tmp_path, kind, single_thread):
    # an SD1.5-era config (diffusers fills missing keys in hash-seed order) and no fixed PYTHONHASHSEED: each rank
    # must still find the same run id and embedding-cache key; flux: a Flux.1-dev-like teacher on the flow schedule;
    # sd3: a flow-matching teacher with three encoders
    teacher = make_pipeline(tmp_path / kind, kind, legacy_config=kind == "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red house\na blue car\n")
    out = tmp_path / "runs" / "out"
    config = dict(teacher=str(teacher), output_dir=str(out), prompts=str(prompts), rank=4, fake_rank=2,
                  max_steps=3, batch_size=1, checkpointing_steps=2, progress=False, tensorboard=False,
                  final_samples=1, device="cpu")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--no-python", sys.executable, "-c", WORKER,
           json.dumps(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs"
    s0, s1 = load_file(str(runs / "rank0.safetensors")), load_file(str(runs / "rank1.safetensors"))
    f0, f1 = load_file(str(runs / "rank0-fake.safetensors")), load_file(str(runs / "rank1-fake.safetensors"))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert all(torch.equal(f0[k], f1[k]) for k in f0)
    assert any(v.abs().sum() > 0 for k, v in s0.items() if "lorad_A" in k)  # the student really trained
    r0, r1 = (json.loads((runs / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    assert r0["writes"] and r1["writes"] == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "final" / "adapter.safetensors").is_file()
    assert r0["text_encoders"] == [True] and r1["text_encoders"] == [False]

    # one process with the same global batch (2 = 2 processes x 1) takes the same steps, within float tolerance
    from wadi_distill.vsd.trainer import DistillConfig, distill

    single = distill(DistillConfig(**{**config, "output_dir": str(tmp_path / "single"), "batch_size": 2}))
    assert single.student_state.keys() == s0.keys()

    def relative_gap(a: dict, b: dict) -> float:
        # Adam divides by sqrt(v): rounding differences of near-zero gradients grow element-wise, so compare the
        # whole of what training changed (the A factors start at zero), not single elements
        keys = [k for k in a if "lorad_A" in k]
        diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
        size = torch.cat([b[k].flatten() for k in keys]).norm()
        assert size > 0
        return float(diff / size)

    # the student's first gradient is rounding noise (student = fake = teacher at A = 0), which Adam's first step
    # normalises to full-size updates: measured 8.6e-4 for the student, 2.6e-6 for the fake score
    assert relative_gap(single.student_state, s0) < 1e-2
    assert relative_gap(single.fake_state, f0) < 1e-4

    def logged(folder):
        lines = (folder / "logs" / "losses.jsonl").read_text().splitlines()
        return torch.tensor([[json.loads(x)["loss_student"], json.loads(x)["loss_fake"]] for x in lines])

    torch.testing.assert_close(logged(out), logged(tmp_path / "single"), rtol=1e-4, atol=1e-7)  # global means
