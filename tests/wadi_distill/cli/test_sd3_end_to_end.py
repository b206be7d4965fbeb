"""An SD3-like teacher (flow matching, three text encoders) through every command: `run`, `sample` (adapter and
merged agree), `export` (a folder the stock SD3Transformer2DModel loads), `evaluate`, resume in new processes,
and a missing text encoder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline, reshard  # noqa: E402

from wadi_distill.cli import app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
CLI = "import torch; torch.set_num_threads(1); from wadi_distill.cli import main; main()"


def _args(teacher, out, prompts, *extra) -> list[str]:
    return ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out), "--rank", "4",
            "--fake-rank", "2", "--batch-size", "1", "--no-tensorboard", *map(str, extra)]


def _cli(args: list[str], cwd: Path, hash_seed: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3-run")
    teacher = make_pipeline(root / "sd3", "sd3")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\n")
    out = root / "run"
    result = runner.invoke(app, _args(teacher, out, prompts, "--max-steps", "2", "--checkpointing-steps", "1"))
    assert result.exit_code == 0, result.output
    return {"root": root, "teacher": teacher, "prompts": prompts, "out": out, "output": result.output}


def test_run_trains_the_joint_blocks_and_writes_final(trained):
    out = trained["out"]
    assert "trained 2 steps" in trained["output"]
    for name in ("adapter.safetensors", "adapter_config.json", "student.safetensors", "samples/grid.png"):
        assert (out / "final" / name).is_file(), name
    losses = [json.loads(line) for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [x["step"] for x in losses] == [1, 2] and all(np.isfinite(x["loss_fake"]) for x in losses)
    adapter = load_file(str(out / "final" / "adapter.safetensors"))
    layers = {k.split(".lorad_")[0] for k in adapter if ".lorad_" in k}
    # 14 Linear layers in the first joint block, 11 in the last (its text stream ends: no to_add_out, ff_context)
    assert len(layers) == 14 + 11 and all(k.startswith("transformer_blocks.") for k in layers)
    trained_a = [v for k, v in adapter.items() if "lorad_A" in k]
    assert any(v.abs().sum() > 0 for v in trained_a)  # the student moved from the teacher


def test_sample_adapter_and_merged_agree(trained, tmp_path):
    final = trained["out"] / "final"
    common = ["sample", "--teacher", str(trained["teacher"]), "--prompt", "a cat", "-n", "2"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for option, path, target in (("--adapter", final, a), ("--merged", final / "student.safetensors", b)):
        done = runner.invoke(app, [*common, option, str(path), "-o", str(target)])
        assert done.exit_code == 0, done.output
    ia, ib = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
    assert ia.shape == ib.shape and np.abs(ia - ib).max() <= 1


def test_export_is_a_folder_the_stock_sd3_transformer_loads(trained, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = tmp_path / "student"
    done = runner.invoke(app, ["export", "--teacher", str(trained["teacher"]), "--adapter",
                               str(trained["out"] / "final"), "-o", str(folder)])
    assert done.exit_code == 0, done.output
    student = SD3Transformer2DModel.from_pretrained(folder, local_files_only=True)
    teacher = SD3Transformer2DModel.from_pretrained(trained["teacher"] / "transformer", local_files_only=True)
    merged = load_file(str(trained["out"] / "final" / "student.safetensors"))
    state = student.state_dict()
    assert state.keys() == teacher.state_dict().keys() == merged.keys()
    torch.testing.assert_close(state, merged, rtol=0, atol=1e-6)
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all(k.startswith("transformer_blocks.") for k in changed)

    # the stock pipeline's one Euler step with the student (σ 1 → 0: x0 = z − v) gives the project's one-step image
    from diffusers import StableDiffusion3Pipeline

    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_distill.teachers.sampling import one_step_images, seeded_noise

    pipe = StableDiffusion3Pipeline.from_pretrained(trained["teacher"], transformer=student, local_files_only=True)
    noise = seeded_noise((4, 8, 8), [3])
    with torch.no_grad():
        theirs = pipe("a cat", num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="pt",
                      height=16, width=16).images
    ours_teacher = load_teacher(trained["teacher"], progress=False)
    ours = one_step_images(ours_teacher, student, ours_teacher.encode_prompts(["a cat"]), [3])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_bf16_sharded_teacher_trains_and_exports_in_bf16(trained, tmp_path):
    """A folder as SD3.5 Large ships its transformer (sharded; here bf16 shards) with fp16-only text encoders."""
    from diffusers import SD3Transformer2DModel

    folder = make_pipeline(tmp_path / "sd3", "sd3", variant="fp16")
    reshard(folder / "transformer")
    teacher_keys = set(json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.bf16.json")
                                  .read_text())["weight_map"])
    out = tmp_path / "out"
    done = runner.invoke(app, _args(folder, out, trained["prompts"], "--max-steps", "1"))
    assert done.exit_code == 0, done.output
    merged = load_file(str(out / "final" / "student.safetensors"))
    assert set(merged) == teacher_keys and {v.dtype for v in merged.values()} == {torch.bfloat16}
    done = runner.invoke(app, ["export", "--teacher", str(folder), "--adapter", str(out / "final"), "-o",
                               str(tmp_path / "student")])
    assert done.exit_code == 0, done.output
    student = SD3Transformer2DModel.from_pretrained(tmp_path / "student", local_files_only=True,
                                                    torch_dtype=torch.bfloat16)
    assert all(torch.equal(v, merged[k]) for k, v in student.state_dict().items())


def test_evaluate_generates_with_the_student_and_scores(trained, tmp_path):
    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x.float() / 255.0, size=(8, 8), mode="bilinear", align_corners=False)
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    torch.jit.script(Features()).save(str(tmp_path / "features.pt"))
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red house\na blue car\n")
    out = tmp_path / "eval.json"
    done = runner.invoke(app, ["evaluate", "--teacher", str(trained["teacher"]), "--adapter",
                               str(trained["out"] / "final"), "--prompts", str(prompts), "--reference",
                               str(reference), "--features", str(tmp_path / "features.pt"), "-o", str(out),
                               "--device", "cpu", "--kid-subsets", "2"])
    assert done.exit_code == 0, done.output
    record = json.loads(out.read_text())
    assert record["generation"]["images"] == 4 and np.isfinite(record["metrics"]["fid"])
    assert len(list((tmp_path / "eval-images").iterdir())) == 4


def test_a_missing_text_encoder_is_one_sentence_and_nothing_is_written(trained, tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(trained["teacher"], folder)
    shutil.rmtree(folder / "text_encoder_3")
    out = tmp_path / "out"
    done = runner.invoke(app, _args(folder, out, trained["prompts"], "--max-steps", "1"))
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "lists 'text_encoder_3' but the folder" in " ".join(done.output.split())
    assert not out.exists()


@pytest.mark.slow
def test_resume_in_new_processes_is_bit_identical(trained, tmp_path):
    """4 steps checkpointed every 2; final/ and checkpoint-4 deleted; resumed under another hash seed."""
    args = _args(trained["teacher"], "B", trained["prompts"], "--max-steps", "4", "--checkpointing-steps", "2")
    first = _cli(args, tmp_path, hash_seed=1)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = {name: load_file(str(tmp_path / "B" / "checkpoint-4" / name))
                 for name in ("student.safetensors", "fake.safetensors")
                 if (tmp_path / "B" / "checkpoint-4" / name).is_file()}
    assert "student.safetensors" in reference
    shutil.rmtree(tmp_path / "B" / "final")
    shutil.rmtree(tmp_path / "B" / "checkpoint-4")
    args[args.index("B")] = str(tmp_path / "B")
    again = _cli([*args, "--resume", "latest"], tmp_path.parent, hash_seed=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 2" in again.stdout and "trained 4 steps" in again.stdout
    for name, tensors in reference.items():
        resumed = load_file(str(tmp_path / "B" / "checkpoint-4" / name))
        assert tensors.keys() == resumed.keys() and all(torch.equal(tensors[k], resumed[k]) for k in tensors)


def test_a_plan_from_a_probe_report_adapts_the_rotated_layers_and_trains(trained, tmp_path):
    """The probe compares the SD3 transformer with a copy whose image-stream q/k/v were rotated (rank 2); the plan
    keeps those layers only, and `run --plan` trains it."""
    from diffusers import SD3Transformer2DModel

    from wadi_probe.analyze import compare
    from wadi_probe.rotation import rotate_pairs

    student = SD3Transformer2DModel.from_pretrained(trained["teacher"] / "transformer", local_files_only=True)
    g = torch.Generator().manual_seed(0)
    rotated = {f"transformer_blocks.{b}.attn.{p}" for b in (0, 1) for p in ("to_q", "to_k", "to_v")}
    with torch.no_grad():
        for name in sorted(rotated):
            layer = student.get_submodule(name)
            theta = 0.2 * torch.randn(layer.weight.shape[0], 2, generator=g) @ torch.randn(
                2, layer.weight.shape[1] // 2, generator=g)
            layer.weight.copy_(rotate_pairs(layer.weight, theta))
    student.save_pretrained(tmp_path / "student")
    report = tmp_path / "report.json"
    compare(trained["teacher"], tmp_path / "student", device="cpu").save(report)
    plan_path = tmp_path / "plan.json"
    done = runner.invoke(app, ["plan", "--teacher", str(trained["teacher"]), "--rank-from-probe", str(report),
                               "--budget", "0.5", "--min-rank", "1", "--multiple-of", "1", "-o", str(plan_path),
                               "--json"])
    assert done.exit_code == 0, done.output
    plan = json.loads(plan_path.read_text())
    assert {e["module"] for e in plan["layers"]} == rotated and all(e["rank"] <= 2 for e in plan["layers"])
    out = tmp_path / "out"
    done = runner.invoke(app, ["run", "--teacher", str(trained["teacher"]), "--prompts", str(trained["prompts"]),
                               "--output-dir", str(out), "--plan", str(plan_path), "--fake-rank", "2",
                               "--batch-size", "1", "--max-steps", "1", "--no-tensorboard"])
    assert done.exit_code == 0, done.output
    adapter = load_file(str(out / "final" / "adapter.safetensors"))
    assert {k.split(".lorad_")[0] for k in adapter if ".lorad_" in k} == rotated
