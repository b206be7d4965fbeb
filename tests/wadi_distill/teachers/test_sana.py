"""The SANA teacher family on a tiny SANA pipeline built from configs (Gemma2, AutoencoderDC, a local tokenizer):
prompt encoding against ``SanaPipeline.encode_prompt``, the denoiser call against the pipeline's own one-step
sample, variant and sharded folders, schedulers, presets, and run / sample / export / evaluate / resume."""

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
from _tiny_features import save_tiny_features  # noqa: E402
from conftest import one_torch_thread  # noqa: E402
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402
from wadi_distill.plan import plan_from_preset  # noqa: E402
from wadi_distill.schedules import FlowMatchSchedule  # noqa: E402
from wadi_distill.teachers.families import Sana  # noqa: E402
from wadi_distill.teachers.pipeline import load_teacher  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
PROMPTS = ["A cat", "the Red House on the tree  "]
CLI = "import torch; torch.set_num_threads(1); from wadi_distill.cli import main; main()"


@pytest.fixture(scope="module")
def sana(tmp_path_factory) -> Path:
    return make_pipeline(tmp_path_factory.mktemp("sana") / "pipe", "sana")


@pytest.fixture(scope="module")
def trained(sana, tmp_path_factory) -> dict[str, Path]:
    """Two VSD steps on the tiny SANA teacher, a checkpoint after each."""
    root = tmp_path_factory.mktemp("sana-run")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\n")
    out = root / "run"
    # one torch thread, as the resume test's subprocess (OMP_NUM_THREADS=1): CPU kernels may sum in another order
    # with another thread count, and bit identity must not depend on what an earlier test left set
    with one_torch_thread():
        result = runner.invoke(app, _run_args(sana, out, prompts))
    assert result.exit_code == 0, result.output
    return {"root": root, "prompts": prompts, "out": out, "output": result.output}


def _run_args(teacher: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out), "--rank", "4",
            "--fake-rank", "2", "--max-steps", "2", "--checkpointing-steps", "1", "--batch-size", "1",
            "--no-tensorboard", *extra]


def test_prompts_are_encoded_as_sana_pipeline_encode_prompt(sana):
    """Lower-cased, the complex human instruction in front, 300 positions selected, its mask; the null prompt is the
    pipeline's negative prompt (no instruction). Bit for bit."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(sana, local_files_only=True)
    ours = load_teacher(sana, load_vae=False).encode_prompts(["", *PROMPTS, ""])
    with torch.no_grad():
        hidden, mask, null, null_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, device="cpu",
                                                           complex_human_instruction=Sana.complex_human_instruction())
    assert hidden.shape == (2, 300, 16) and ours.encoder_hidden_states.shape == (4, 300, 16)
    assert torch.equal(hidden, ours.encoder_hidden_states[1:3]) and torch.equal(mask, ours.attention_mask[1:3])
    for row in (0, 3):
        assert torch.equal(null[0], ours.encoder_hidden_states[row]) and torch.equal(null_mask[0], ours.attention_mask[row])
    assert ours.attention_mask[0].tolist() == [1] + [0] * 299  # "" is <bos> alone
    assert not torch.equal(ours.encoder_hidden_states[1], ours.encoder_hidden_states[2])
    # the instruction really is there: without it the pipeline gives other states
    with torch.no_grad():
        plain = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                   complex_human_instruction=None)[0]
    assert not torch.allclose(plain, hidden)


def test_the_one_step_sample_is_the_pipelines_one_euler_step_and_decode_is_its_image(sana):
    """SanaPipeline with one Euler step from σ = 1 to 0 (no guidance) gives z − v(z, 1000): our call at σ = 1 turned
    into x̂0; its decoded image (AutoencoderDC, scaling factor) equals ours."""
    from diffusers import SanaPipeline

    teacher = load_teacher(sana)
    assert isinstance(teacher.family, Sana) and isinstance(teacher.schedule, FlowMatchSchedule)
    assert teacher.schedule.shift == 3.0 and teacher.latent_shape == (4, 8, 8) and teacher.image_size == 32
    pipe = SanaPipeline.from_pretrained(sana, local_files_only=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt=PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z, height=32, width=32,
                  use_resolution_binning=False)
    with torch.no_grad():
        latents = pipe(**kwargs, output_type="latent").images
        images = pipe(**kwargs, output_type="pt").images
        cond = teacher.encode_prompts(PROMPTS)
        t = teacher.schedule.terminal_timesteps(2, "cpu")
        x0 = teacher.schedule.one_step_x0(teacher.call(teacher.denoiser, z, t, cond), z)
        direct = teacher.denoiser(z, encoder_hidden_states=cond.encoder_hidden_states, timestep=torch.full((2,), 1000.0),
                                  encoder_attention_mask=cond.attention_mask, return_dict=False)[0]
        half = teacher.call(teacher.denoiser, z, torch.full((2,), 0.25), cond)
        at_250 = teacher.denoiser(z, encoder_hidden_states=cond.encoder_hidden_states, timestep=torch.full((2,), 250.0),
                                  encoder_attention_mask=cond.attention_mask, return_dict=False)[0]
    torch.testing.assert_close(x0, latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(x0, z - direct, rtol=0, atol=1e-6)
    assert torch.equal(half, at_250)  # timestep = σ·1000
    # the decode on the pipeline's own latents: x0 and those agree within 1e-6 (above), and the random VAE can
    # amplify that (1.25e-6 seen on a fresh install, 2026-12-04), which is not what this line checks
    torch.testing.assert_close(teacher.decode(latents), images, rtol=0, atol=1e-6)
    assert images.shape == (2, 3, 32, 32)


def test_released_dpm_solver_scheduler_and_refusals(sana, tmp_path):
    """SANA's releases ship DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction): the same flow schedule;
    a VP scheduler in a SanaPipeline folder and a guidance-distilled transformer are refused in one sentence."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, SanaTransformer2DModel

    folder = tmp_path / "pipe"
    shutil.copytree(sana, folder)
    index = json.loads((folder / "model_index.json").read_text())
    shutil.rmtree(folder / "scheduler")
    DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    assert load_teacher(folder, load_text_encoders=False, load_vae=False).schedule == \
        load_teacher(sana, load_text_encoders=False, load_vae=False).schedule
    shutil.rmtree(folder / "scheduler")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(WadiInputError, match="This sana teacher runs on a flow-matching scheduler .* not DDPMScheduler"):
        load_teacher(folder, load_text_encoders=False, load_vae=False)
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(WadiInputError, match="num_train_timesteps=1000, not 500"):
        Sana.schedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=500))
    config = SanaTransformer2DModel.load_config(sana / "transformer")
    with pytest.raises(WadiInputError, match="guidance_embeds=True"):
        Sana.check_denoiser(SanaTransformer2DModel.from_config({**config, "guidance_embeds": True}))


def test_bf16_variant_and_sharded_folders_load_the_same_weights(sana, tmp_path):
    from diffusers import SanaTransformer2DModel
    from transformers import Gemma2Model

    folder = tmp_path / "pipe"
    shutil.copytree(sana, folder)
    transformer = SanaTransformer2DModel.from_pretrained(sana / "transformer")
    original = {k: v.clone() for k, v in transformer.state_dict().items()}
    shutil.rmtree(folder / "transformer")
    transformer.to(torch.bfloat16).save_pretrained(folder / "transformer", variant="bf16")
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.bf16.safetensors"]
    encoder = Gemma2Model.from_pretrained(sana / "text_encoder")
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder", max_shard_size="5KB")
    assert len(list((folder / "text_encoder").glob("model-*-of-*.safetensors"))) > 1
    teacher = load_teacher(folder)
    loaded = teacher.denoiser.state_dict()
    assert loaded.keys() == original.keys()  # read from the bf16 file (held in fp32, as every teacher)
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16).float()) for k, v in original.items())
    assert not all(torch.equal(loaded[k], v) for k, v in original.items())
    reference = load_teacher(sana).encode_prompts(PROMPTS)
    assert torch.equal(teacher.encode_prompts(PROMPTS).encoder_hidden_states, reference.encoder_hidden_states)


def test_presets_cover_the_attention_linears_and_paper_conv_adds_glumbconv(sana):
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel.from_pretrained(sana / "transformer")
    paper = plan_from_preset(model, 2)
    names = [e.module for e in paper.layers]
    assert names == [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                     for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert "4 Conv2d layers left frozen" in " ".join(paper.notes)  # GLUMBConv's three and the patch embedding
    conv = plan_from_preset(model, 2, "paper-conv")
    added = [e.module for e in conv.layers if e.module not in names]
    assert added == [f"transformer_blocks.0.ff.{c}" for c in ("conv_inverted", "conv_depth", "conv_point")]


def test_run_writes_a_student_of_the_attention_layers(trained, sana):
    out = trained["out"]
    assert "trained 2 steps" in trained["output"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 8 and all(".attn" in m for m in config["target_modules"])
    training = json.loads((out / "final" / "training.json").read_text())
    assert "sana" in json.dumps(training)
    losses = [json.loads(line) for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in losses] == [1, 2]


def test_export_is_loaded_by_the_stock_transformer_class(trained, sana, tmp_path):
    from diffusers import SanaTransformer2DModel

    folder = tmp_path / "student"
    result = runner.invoke(app, ["export", "--teacher", str(sana), "--adapter", str(trained["out"] / "final"),
                                 "-o", str(folder)])
    assert result.exit_code == 0, result.output
    stock = SanaTransformer2DModel.from_pretrained(folder)
    exported = stock.state_dict()
    merged = load_file(str(trained["out"] / "final" / "student.safetensors"))
    teacher = load_file(str(sana / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == teacher.keys() == merged.keys()
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
    changed = sorted(k for k in teacher if not torch.equal(teacher[k], exported[k]))
    assert changed and all(".attn" in k and k.endswith(".weight") for k in changed)


def test_a_plan_from_a_probe_report_of_the_trained_student(trained, sana, tmp_path):
    """The probe compares the teacher and the exported student; the plan from its report adapts the layers the run
    changed (the attention linears), with ranks within the budget, and refuses nothing."""
    from wadi_probe.analyze import compare

    folder = tmp_path / "student"
    assert runner.invoke(app, ["export", "--teacher", str(sana), "--adapter", str(trained["out"] / "final"),
                               "-o", str(folder)]).exit_code == 0
    report = tmp_path / "report.json"
    compare(sana / "transformer", folder, device="cpu").save(report)
    result = runner.invoke(app, ["plan", "--teacher", str(sana), "--rank-from-probe", str(report), "--budget", "0.5",
                                 "--min-rank", "1", "--multiple-of", "1", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    adapted = sorted(e["module"] for e in plan["layers"])
    assert adapted == sorted(f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                             for p in ("to_q", "to_k", "to_v", "to_out.0"))
    assert all(1 <= e["rank"] <= 4 for e in plan["layers"])  # the run's rank 4
    reasons = {s["module"]: s["reason"] for s in plan["skipped"]}
    assert reasons["transformer_blocks.0.ff.conv_inverted"].startswith("Conv2d layer")
    assert reasons["proj_out"] == "identical in teacher and student"


def test_paper_conv_trains_glumbconv_and_the_probe_plans_it_with_include_conv(trained, sana, tmp_path):
    """``--preset paper-conv`` adapts the feed-forward's three convolutions (the depthwise one too): the exported
    student, loaded by the stock class, differs there, and the probe's plan with --include-conv adapts them."""
    from diffusers import SanaTransformer2DModel
    from wadi_probe.analyze import compare

    out = tmp_path / "run"
    result = runner.invoke(app, _run_args(sana, out, trained["prompts"], "--preset", "paper-conv"))
    assert result.exit_code == 0, result.output
    convs = [f"transformer_blocks.0.ff.{c}" for c in ("conv_inverted", "conv_depth", "conv_point")]
    assert set(convs) <= set(json.loads((out / "final" / "adapter_config.json").read_text())["target_modules"])
    folder = tmp_path / "student"
    assert runner.invoke(app, ["export", "--teacher", str(sana), "--adapter", str(out / "final"),
                               "-o", str(folder)]).exit_code == 0
    exported = SanaTransformer2DModel.from_pretrained(folder).state_dict()
    teacher = load_file(str(sana / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(not torch.equal(exported[f"{c}.weight"], teacher[f"{c}.weight"]) for c in convs)
    report = tmp_path / "report.json"
    compare(sana / "transformer", folder, device="cpu").save(report)
    result = runner.invoke(app, ["plan", "--teacher", str(sana), "--rank-from-probe", str(report), "--budget", "0.5",
                                 "--min-rank", "1", "--multiple-of", "1", "--include-conv", "--json"])
    assert result.exit_code == 0, result.output
    assert set(convs) <= {e["module"] for e in json.loads(result.output)["layers"]}


def test_sample_from_the_adapter_and_the_merged_student_agree(trained, sana, tmp_path):
    grids = []
    for flag, path in (("--adapter", trained["out"] / "final"),
                       ("--merged", trained["out"] / "final" / "student.safetensors")):
        grid = tmp_path / f"{flag[2:]}.png"
        result = runner.invoke(app, ["sample", "--teacher", str(sana), flag, str(path), "--prompt", "a cat",
                                     "--prompt", "a dog", "-n", "2", "-o", str(grid)])
        assert result.exit_code == 0, result.output
        grids.append(Image.open(grid).convert("RGB"))
    assert grids[0].size == grids[1].size == (70, 70)  # two prompts × two 32-pixel images, with the grid's margins
    diff = torch.tensor(list(grids[0].getdata())) - torch.tensor(list(grids[1].getdata()))
    assert diff.abs().max() <= 1  # the merged weights round the same sums differently at most by one level


def test_evaluate_generates_and_scores_the_student(trained, sana, tmp_path):
    import numpy as np

    save_tiny_features(tmp_path / "features.pt")
    reference = tmp_path / "real"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\na green tree\na big house\n")
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--teacher", str(sana), "--adapter", str(trained["out"] / "final"),
                                 "--prompts", str(tmp_path / "prompts.txt"), "--reference", str(reference),
                                 "--features", str(tmp_path / "features.pt"), "-o", str(out), "--batch-size", "2",
                                 "--device", "cpu", "--kid-subsets", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["generation"]["images"] == 4 and record["metrics"]["fid"] > 0
    images = sorted((tmp_path / "eval-images").iterdir())
    assert len(images) == 4 and all(Image.open(p).size == (32, 32) for p in images)


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_identical(trained, sana, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    reference = load_file(str(out / "checkpoint-2" / "student.safetensors"))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-2")
    env = {**os.environ, "PYTHONHASHSEED": "3", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CLI, *_run_args(sana, out, trained["prompts"], "--resume", "latest")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 1" in done.stdout and "trained 2 steps" in done.stdout
    resumed = load_file(str(out / "checkpoint-2" / "student.safetensors"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.parametrize("damage", ["unlisted", "folder"])
def test_a_folder_missing_its_text_encoder_is_refused_in_one_sentence(damage, trained, sana, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(sana, folder)
    shutil.rmtree(folder / "text_encoder")
    if damage == "unlisted":
        index = json.loads((folder / "model_index.json").read_text())
        del index["text_encoder"]
        (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    result = runner.invoke(app, _run_args(folder, out, trained["prompts"]))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    assert ("has no 'text_encoder' component" if damage == "unlisted" else "lists 'text_encoder' but the folder") in text
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(sana, tmp_path):
    """torchrun, two CPU processes (gloo), batch 1 each: the same adapter and logged losses as one process with
    batch 2, within float tolerance (measured: 5e-6 relative on the A factors)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red house\na blue car\n")

    def args(out: Path, batch: int) -> list[str]:
        return ["run", "--teacher", str(sana), "--prompts", str(prompts), "--output-dir", str(out), "--rank", "4",
                "--fake-rank", "2", "--max-steps", "3", "--batch-size", str(batch), "--no-tensorboard",
                "--device", "cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "--no-python", sys.executable, "-c", CLI,
                           *args(tmp_path / "two", 1)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert runner.invoke(app, args(tmp_path / "one", 2)).exit_code == 0
    two, one = (load_file(str(tmp_path / name / "final" / "adapter.safetensors")) for name in ("two", "one"))
    keys = [k for k in one if "lorad_A" in k]
    assert two.keys() == one.keys() and keys
    gap = torch.cat([(two[k] - one[k]).flatten() for k in keys]).norm() / torch.cat([one[k].flatten() for k in keys]).norm()
    assert gap < 1e-3

    def logged(name: str) -> torch.Tensor:
        lines = (tmp_path / name / "logs" / "losses.jsonl").read_text().splitlines()
        return torch.tensor([[json.loads(x)["loss_student"], json.loads(x)["loss_fake"]] for x in lines])

    torch.testing.assert_close(logged("two"), logged("one"), rtol=1e-4, atol=1e-7)
