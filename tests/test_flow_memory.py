"""``benchmarks/flow_memory.py``: the fake-tensor estimate of a VSD step equals the same step on real tensors.

Tiny configs of the four families (an SD UNet, SD3, Flux.1 and SANA transformers): the step built on fake tensors
and the step built on real CPU tensors are counted by the same meter; peak bytes, the bytes left at the end, the
weights' bytes and the FLOPs must be equal to the byte, and the parameter counts equal the plan's formula.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import flow_memory
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

TINY = {
    "sd15": ({"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
              "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
              "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 16}, 64),
    "sd3": ({"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
             "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
             "caption_projection_dim": 16, "pooled_projection_dim": 24, "out_channels": 4, "pos_embed_max_size": 16,
             "qk_norm": "rms_norm", "dual_attention_layers": [0]}, 64),
    "flux": ({"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 1,
              "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "pooled_projection_dim": 24, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}, 64),
    "sana": ({"_class_name": "SanaTransformer2DModel", "in_channels": 4, "out_channels": 4, "num_attention_heads": 2,
              "attention_head_dim": 8, "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
              "cross_attention_dim": 16, "caption_channels": 24, "mlp_ratio": 2.5, "sample_size": 8, "patch_size": 1,
              "norm_elementwise_affine": False}, 256),
}


def _config(tmp_path: Path, family: str) -> Path:
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(TINY[family][0]))
    return path


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("precision, checkpointing", [("bf16", True), ("fp32", False)])
def test_fake_estimate_equals_the_real_step(tmp_path, family, precision, checkpointing):
    torch.set_num_threads(1)
    kwargs = dict(image_size=TINY[family][1], text_tokens=7, rank=4, fake_rank=2, precision=precision,
                  checkpointing=checkpointing, block=1)
    fake = flow_memory.estimate(family, _config(tmp_path, family), fake=True, **kwargs)
    real = flow_memory.estimate(family, _config(tmp_path, family), fake=False, **kwargs)
    for key in ("peak_bytes", "end_bytes", "static_bytes", "flops", "phase_peaks", "peak_phase", "student_params",
                "fake_params", "base_params"):
        assert fake[key] == real[key], key
    assert all(math.isnan(v) for v in fake["losses"].values())
    assert all(math.isfinite(v) for v in real["losses"].values())
    # what stays after the step: weights, adapters and both Adam states (exp_avg, exp_avg_sq; the step counts are
    # 4-byte scalars, one per parameter tensor)
    element = 2 if precision == "bf16" else 4
    adapters = 4 * (real["student_params"] + real["fake_params"])
    assert real["static_bytes"] == element * real["base_params"] + adapters + real["base_buffer_bytes"]
    tensors = 2 * 2 * real["adapted_layers"]  # A and B of two adapters on every layer
    assert real["end_bytes"] == real["static_bytes"] + 2 * adapters + 4 * tensors
    assert real["peak_bytes"] > real["end_bytes"] and real["flops"] > 0


def test_adapter_counts_are_the_paper_preset_at_real_size():
    """The student and fake adapters the estimate trains are the paper preset's, counted on the meta device."""
    from wadi_distill.lorad.config import adapter_param_count
    from wadi_distill.plan import plan_from_preset

    cls, kwargs = flow_memory.read_config(flow_memory.CONFIG_DIR / "flux.1-dev.json")
    with torch.device("meta"):
        model = cls(**kwargs)
    plan = plan_from_preset(model, 256, "paper")
    assert len(plan.layers) == 494 and plan.trainable_params == 1_075_838_976
    assert plan.trainable_params == sum(adapter_param_count(e.shape, 256) for e in plan.layers)
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320


def test_the_real_configs_build_and_block_rounding(tmp_path):
    for name in ("sd15.json", "sd3.5-medium.json", "sd3.5-large.json", "flux.1-dev.json", "sana-1600m-1024px.json"):
        cls, kwargs = flow_memory.read_config(flow_memory.CONFIG_DIR / name)
        with torch.device("meta"):
            cls(**kwargs)
    rounded = flow_memory.estimate("sana", _config(tmp_path, "sana"), image_size=256, text_tokens=7, rank=4,
                                   fake_rank=2)
    exact = flow_memory.estimate("sana", _config(tmp_path, "sana"), image_size=256, text_tokens=7, rank=4,
                                 fake_rank=2, block=1)
    assert rounded["peak_bytes"] % 512 == 0 and exact["peak_bytes"] <= rounded["peak_bytes"]
    assert flow_memory.card_fit(20 * 2**30)[0] == 48 and flow_memory.card_fit(10 * 2**30)[0] == 24
    assert flow_memory.card_fit(200 * 2**30) is None


def test_cli_prints_a_table_within_80_columns_and_refuses_bad_input(tmp_path):
    config = _config(tmp_path, "flux")
    run = [sys.executable, str(ROOT / "benchmarks" / "flow_memory.py")]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(run + ["--family", "flux", "--config", str(config), "--image-size", "64", "--rank", "4",
                                 "--json", str(tmp_path / "out.json")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ESTIMATE" in done.stdout and max(len(line) for line in done.stdout.splitlines()) <= 80
    assert json.loads((tmp_path / "out.json").read_text())["family"] == "flux"
    (tmp_path / "bad.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    for args, message in ((["--family", "flux", "--config", str(tmp_path / "missing.json")], "no such file"),
                          (["--family", "flux", "--config", str(tmp_path / "bad.json")], "names no diffusers model"),
                          (["--family", "flux", "--image-size", "100"], "--image-size must be")):
        done = subprocess.run(run + args, capture_output=True, text=True, env=env)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
