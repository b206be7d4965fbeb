"""A tiny Flux.1 teacher through every command: run, resume in a new process, sample, export (loaded by the stock
FluxTransformer2DModel and sampled by the stock FluxPipeline in one step), evaluate; the guidance refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
CLI = "import torch; torch.set_num_threads(1); from wadi_distill.cli import main; main()"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-cli")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\na green tree\n")
    return {"root": root, "prompts": prompts, "dev": make_pipeline(root / "dev", "flux"),
            "schnell": make_pipeline(root / "schnell", "flux-schnell"), "sd": make_pipeline(root / "sd", "sd")}


def _run_args(teacher: Path, out: Path, prompts: Path, *extra) -> list[str]:
    return ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out), "--rank", "2",
            "--fake-rank", "2", "--no-tensorboard", "--no-progress", "--device", "cpu", *map(str, extra)]


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _fails(args: list[str], *messages: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text and all(m in text for m in messages), text


@pytest.fixture(scope="module")
def trained(world) -> Path:
    out = world["root"] / "run"
    _ok(_run_args(world["dev"], out, world["prompts"], "--max-steps", 4, "--checkpointing-steps", 2))
    return out


def test_run_records_the_guidance_and_trains_on_the_flow_schedule(trained):
    config = json.loads((trained / "run.json").read_text())["config"]
    assert (config["cfg"], config["teacher_guidance"]) == (1.0, 3.5)  # resolved from the family
    state = json.loads((trained / "checkpoint-4" / "state.json").read_text())
    assert (state["options"]["teacher_guidance"], state["options"]["cfg"]) == (3.5, 1.0)
    adapter = load_file(str(trained / "final" / "adapter.safetensors"))
    assert any(k.startswith("single_transformer_blocks.0.proj_mlp") for k in adapter)
    assert any(k.startswith("transformer_blocks.0.norm1_context.linear") for k in adapter)
    assert (trained / "final" / "samples" / "grid.png").is_file()


def test_resume_in_a_new_process_is_bit_identical(world, trained, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    reference = {name: load_file(str(out / "checkpoint-4" / name)) for name in ("student.safetensors", "fake.safetensors")}
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "7"}
    args = _run_args(world["dev"], out, world["prompts"], "--max-steps", 4, "--checkpointing-steps", 2,
                     "--resume", "latest")
    done = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stdout and "trained 4 steps" in done.stdout
    for name, tensors in reference.items():
        again = load_file(str(out / "checkpoint-4" / name))
        assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors), name
    # another real-score guidance is another training: refused, naming the option
    _fails([*args[:-2], "--max-steps", 6, "--resume", "latest", "--guidance", 5], "--teacher-guidance 3.5",
           "--teacher-guidance 5.0")


def test_export_loads_in_the_stock_classes_and_samples_in_one_flux_pipeline_step(world, trained, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from wadi_distill.one_step import load_student
    from wadi_distill.teachers.families import Flux
    from wadi_distill.teachers.sampling import one_step_generate, seeded_noise

    folder = tmp_path / "student"
    _ok(["export", "--teacher", world["dev"], "--adapter", trained / "final", "-o", folder])
    student = FluxTransformer2DModel.from_pretrained(folder, local_files_only=True)
    merged = load_file(str(trained / "final" / "student.safetensors"))
    state = student.state_dict()
    assert state.keys() == merged.keys() and all(torch.equal(state[k], merged[k]) for k in merged)
    teacher = load_teacher_state(world["dev"])
    assert any(not torch.equal(state[k], teacher[k]) for k in teacher)  # the adapter is merged in
    # our one-step sample from the adapter equals the stock pipeline's single step with the exported transformer
    bundle, denoiser = load_student(world["dev"], adapter=trained / "final")
    cond = bundle.encode_prompts(["a cat", "a green tree"])
    z = seeded_noise(bundle.latent_shape, [0, 1])
    ours = one_step_generate(denoiser, bundle.call, bundle.schedule, cond, z)
    pipe = FluxPipeline.from_pretrained(world["dev"], transformer=student, local_files_only=True)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond.encoder_hidden_states, pooled_prompt_embeds=cond.pooled,
                      latents=Flux.pack(z), num_inference_steps=1, height=16, width=16, output_type="latent").images
    torch.testing.assert_close(Flux.pack(ours), theirs, rtol=0, atol=1e-5)


def load_teacher_state(root: Path) -> dict[str, torch.Tensor]:
    from wadi_distill.teachers.pipeline import load_teacher

    return load_teacher(root, load_text_encoders=False, load_vae=False).denoiser.state_dict()


class PooledColours(torch.nn.Module):
    """uint8 (B, 3, H, W) → (B, 12): the mean colour of each image quarter, a feature network for the test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


def test_sample_adapter_and_merged_agree_and_evaluate_scores_them(world, trained, tmp_path):
    common = ["sample", "--teacher", world["dev"], "--prompt", "a cat", "--prompt", "a red house", "-n", 2]
    _ok([*common, "--adapter", trained / "final", "-o", tmp_path / "a"])
    _ok([*common, "--merged", trained / "final" / "student.safetensors", "-o", tmp_path / "m"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    for name in names:
        a, m = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "m" / name)
        assert a.size == (16, 16) and a.tobytes() == m.tobytes()
    features = tmp_path / "features.pt"
    torch.jit.script(PooledColours()).save(str(features))
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(4):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(reference / f"{i}.png")
    record = tmp_path / "eval.json"
    _ok(["evaluate", "--teacher", world["dev"], "--adapter", trained / "final", "--prompts", world["prompts"],
         "--reference", reference, "--features", features, "-o", record, "--kid-subsets", 2, "--device", "cpu"])
    result = json.loads(record.read_text())
    assert result["counts"] == {"images": 4, "reference": 4} and result["metrics"]["fid"] >= 0
    generated = sorted((tmp_path / "eval-images").iterdir())
    assert len(generated) == 4 and Image.open(generated[0]).size == (16, 16)


def test_a_bf16_only_schnell_folder_runs_in_bf16_and_exports_in_its_dtype(world, tmp_path):
    """FLUX.1-schnell (no guidance embedding, no dynamic shift) shipped as bf16 variant files only."""
    teacher = make_pipeline(tmp_path / "schnell-bf16", "flux-schnell", variant="bf16")
    out = tmp_path / "out"
    _ok(_run_args(teacher, out, world["prompts"], "--max-steps", 1, "--checkpointing-steps", 1,
                  "--mixed-precision", "bf16"))
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["cfg"], config["teacher_guidance"]) == (1.0, None)
    merged = load_file(str(out / "final" / "student.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}  # the teacher's own dtype, as export writes it


def test_gradient_checkpointing_trains_the_same_adapters(world, tmp_path):
    """The recomputed forward passes of the double- and single-stream blocks keep each role's adapter switched on."""
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        _ok(_run_args(world["dev"], tmp_path / name, world["prompts"], "--max-steps", 2, *extra))
    for part in ("student.safetensors", "fake.safetensors"):
        a = load_file(str(tmp_path / "plain" / "checkpoint-2" / part))
        b = load_file(str(tmp_path / "checkpointed" / "checkpoint-2" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lorad_A" in k)  # both really trained


def test_guidance_and_cfg_refusals_write_nothing(world, tmp_path):
    out = tmp_path / "o"
    for teacher in ("sd", "schnell"):
        _fails(_run_args(world[teacher], out, world["prompts"], "--max-steps", 1, "--guidance", 3),
               "has no guidance embedding, so a guidance value (3) does not apply to it; leave --guidance out.")
        assert not out.exists()
    _fails(_run_args(world["dev"], out, world["prompts"], "--max-steps", 1, "--cfg", 2),
           "is guidance-distilled", "use --cfg 1, not 2.")
    _fails(_run_args(world["dev"], out, world["prompts"], "--max-steps", 1, "--guidance", -1),
           "guidance must be a non-negative number")
    _fails(_run_args(world["dev"], out, world["prompts"], "--max-steps", 1, "--fake-cfg", 2),
           "is guidance-distilled", "use --fake-cfg 1 or leave it out, not 2.")
    _fails(_run_args(world["sd"], out, world["prompts"], "--max-steps", 1, "--fake-cfg", -1),
           "fake-cfg must be a non-negative number (1 turns guidance off), not -1.")
    assert not out.exists()
