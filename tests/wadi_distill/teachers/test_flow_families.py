"""What the three flow-matching families (SD3, Flux, SANA) share, checked the same way for each: the refusals of a
scheduler or denoiser class outside the family (one sentence, exit 2, nothing written), the σ → timestep
conversion of each pipeline, the text encoders' dtype rule and the pooled-embeddings refusal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402
from wadi_distill.teachers.conditioning import Conditioning  # noqa: E402
from wadi_distill.teachers.families import Flux, PixArt, Sana, StableDiffusion, StableDiffusion3  # noqa: E402
from wadi_distill.teachers.families import StableDiffusionXL  # noqa: E402
from wadi_distill.teachers.pipeline import load_teacher  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
KINDS = {"sd3": "sd3", "flux": "flux", "sana": "sana"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-families")
    (root / "prompts.txt").write_text("a cat\na red house\n")
    return {"root": root, **{name: make_pipeline(root / name, kind) for name, kind in KINDS.items()}}


def _copy_with(src: Path, dst: Path, **index_entries) -> Path:
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index.update(index_entries)
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def _refused(folders: dict, teacher: Path, out: Path, *messages: str) -> None:
    result = runner.invoke(app, ["run", "--teacher", str(teacher), "--prompts", str(folders["root"] / "prompts.txt"),
                                 "-o", str(out), "--rank", "2", "--max-steps", "1", "--device", "cpu",
                                 "--no-progress", "--no-tensorboard"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text and text.startswith("error: ") and text.count(". ") == 0, text
    assert all(m in text for m in messages), text
    assert not out.exists()


@pytest.mark.parametrize("name", list(KINDS))
def test_a_vp_scheduler_is_refused_in_one_sentence_for_every_flow_family(folders, tmp_path, name):
    """A DDPM scheduler in an SD3, Flux or SANA folder: the same sentence for each (Flux used to fail with an
    AttributeError traceback, exit 1)."""
    from diffusers import DDPMScheduler

    folder = _copy_with(folders[name], tmp_path / "bad", scheduler=["diffusers", "DDPMScheduler"])
    DDPMScheduler().save_pretrained(folder / "scheduler")
    _refused(folders, folder, tmp_path / "out",
             f"error: This {name} teacher runs on a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, or a "
             "multistep one with use_flow_sigmas), not DDPMScheduler.")


@pytest.mark.parametrize("name", list(KINDS))
def test_a_denoiser_class_outside_the_family_is_refused_before_its_weights_are_read(folders, tmp_path, name):
    """The class named in model_index.json is checked first: the refusal names it even though the folder's
    transformer weights are gone (they used to be loaded into the wrong class, with diffusers' warnings, first)."""
    import shutil

    folder = _copy_with(folders[name], tmp_path / "bad", transformer=["diffusers", "PixArtTransformer2DModel"])
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    expected = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "sana": "SanaTransformer2DModel"}
    _refused(folders, folder, tmp_path / "out", f"error: The denoiser class PixArtTransformer2DModel is not "
             f"supported for {name} teachers; expected {expected[name]}.")


def test_a_flow_scheduler_in_an_sd_folder_is_refused(folders, tmp_path):
    """The other way round: an SD UNet with a FlowMatchEulerDiscreteScheduler (it used to train, the UNet given σ in
    [0, 1] as its timestep)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = make_pipeline(tmp_path / "sd", "sd")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    _refused(folders, folder, tmp_path / "out", "error: This sd teacher runs on a DDPM-style scheduler "
             "(alphas_cumprod), not on the flow-matching FlowMatchEulerDiscreteScheduler.")


@pytest.mark.parametrize("family", [StableDiffusion3, Flux, Sana])
def test_a_flow_scheduler_with_other_train_timesteps_is_refused(family):
    """Every flow family's σ → timestep conversion assumes the 1000-step scheduler its pipeline ships (SD3 and Flux
    used to take any count silently)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert family.schedule(FlowMatchEulerDiscreteScheduler(shift=3.0)).num_train_timesteps == 1000
    with pytest.raises(WadiInputError, match=f"^This {family.name} teacher needs a scheduler with "
                                             r"num_train_timesteps=1000, not 500\.$"):
        family.schedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=500))


def test_sigma_becomes_each_pipelines_timestep():
    """σ·1000 for SD3 (the scheduler's timesteps), σ·1000·timestep_scale for SANA, σ for Flux (t/1000); a scalar σ
    is expanded to the batch, float32 either way."""
    sigma = torch.tensor([0.25, 1.0])
    assert torch.equal(StableDiffusion3(8, 4).flow_timesteps(sigma, 2), torch.tensor([250.0, 1000.0]))
    assert torch.equal(Sana(8, 4).flow_timesteps(sigma, 2, 0.5), torch.tensor([125.0, 500.0]))
    flux = Flux(8, 4).flow_timesteps(torch.tensor(0.5, dtype=torch.float64), 3)
    assert flux.dtype == torch.float32 and torch.equal(flux, torch.full((3,), 0.5))
    with pytest.raises(TypeError):  # a VP family has no flow conversion
        StableDiffusion(8, 4).flow_timesteps(sigma, 2)


def test_text_encoders_with_t5_or_gemma_load_in_bf16_when_fp16_is_asked():
    """One rule for PixArt, SD3, Flux (T5) and SANA (Gemma2); CLIP-only families keep fp16; other dtypes pass."""
    for family in (PixArt, StableDiffusion3, Flux, Sana):
        assert family.text_encoder_dtype(torch.float16) == torch.bfloat16
        assert family.text_encoder_dtype(torch.float32) == torch.float32 and family.text_encoder_dtype(None) is None
    for family in (StableDiffusion, StableDiffusionXL):
        assert family.text_encoder_dtype(torch.float16) == torch.float16


@pytest.mark.parametrize("family", [StableDiffusionXL, StableDiffusion3, Flux])
def test_a_family_with_pooled_inputs_refuses_a_conditioning_without_them(family):
    cond = Conditioning(torch.zeros(1, 4, 8))
    with pytest.raises(WadiInputError, match=f"^This {family.name} teacher needs pooled text embeddings; the "
                                             r"embedding cache has none\.$"):
        family(8, 4)(torch.nn.Identity(), torch.zeros(1, 4, 2, 2), torch.tensor(1.0), cond)


def test_the_sd3_timestep_reaches_the_transformer_as_sigma_times_1000(folders):
    """The teacher call passes σ·1000 (checked on the transformer's own input, not only on the helper)."""
    teacher = load_teacher(folders["sd3"], load_text_encoders=False, load_vae=False, progress=False)
    seen = []
    handle = teacher.denoiser.time_text_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    channels, side, _ = teacher.latent_shape
    cond = Conditioning(torch.zeros(1, 5, teacher.denoiser.config.joint_attention_dim),
                        pooled=torch.zeros(1, teacher.denoiser.config.pooled_projection_dim))
    try:
        teacher.family(teacher.denoiser, torch.zeros(1, channels, side, side), torch.tensor(0.3), cond)
    finally:
        handle.remove()
    assert torch.allclose(seen[0], torch.tensor([300.0]))


def test_export_in_the_ldm_layout_is_refused_for_a_flow_transformer(folders, tmp_path):
    """--format ldm writes SD UNets only; a flow teacher's export says so and names the working format, exit 2,
    nothing written (it used to say the single-file layout exists for UNets only, which Flux and SD3 files belie)."""
    from diffusers import FluxTransformer2DModel
    from tiny_pipelines import random_lorad_adapter

    transformer = FluxTransformer2DModel.from_pretrained(folders["flux"] / "transformer", local_files_only=True)
    adapter = random_lorad_adapter(transformer, tmp_path / "adapter")
    out = tmp_path / "student.safetensors"
    result = runner.invoke(app, ["export", "--teacher", str(folders["flux"]), "--adapter", str(adapter), "-o", str(out),
                                 "--format", "ldm"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert text.count("error:") == 1 and text.endswith(
        "error: --format ldm writes the original single-file layout of SD1.x/2.x/XL UNets only; these weights are not "
        "a UNet2DConditionModel (use --format diffusers)."), text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


class MeanColour(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 3): each channel's mean, a feature network for evaluate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_evaluate_with_fewer_prompts_than_the_metrics_need_writes_nothing(folders, tmp_path):
    """Two prompts, k = 3: refused before generating (the images used to be written, then refused)."""
    from tiny_pipelines import random_lorad_adapter
    from diffusers import SanaTransformer2DModel

    transformer = SanaTransformer2DModel.from_pretrained(folders["sana"] / "transformer", local_files_only=True)
    adapter = random_lorad_adapter(transformer, tmp_path / "adapter")
    from PIL import Image

    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(reference / f"{i}.png")
    features = tmp_path / "features.pt"
    torch.jit.script(MeanColour()).save(str(features))
    out = tmp_path / "out" / "evaluation.json"
    result = runner.invoke(app, ["evaluate", "--teacher", str(folders["sana"]), "--adapter", str(adapter),
                                 "--prompts", str(folders["root"] / "prompts.txt"), "--reference", str(reference),
                                 "--features", str(features), "-o", str(out), "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert text.endswith("error: the prompt file gives 2 images; the metrics need at least 4 (k = 3)."), text
    assert not (tmp_path / "out").exists()


def test_sample_of_one_image_says_image(folders, tmp_path):
    """One prompt, -n 1: "wrote 1 one-step image" (it said "1 one-step images")."""
    from tiny_pipelines import random_lorad_adapter
    from diffusers import SanaTransformer2DModel

    transformer = SanaTransformer2DModel.from_pretrained(folders["sana"] / "transformer", local_files_only=True)
    adapter = random_lorad_adapter(transformer, tmp_path / "adapter")
    out = tmp_path / "one.png"
    result = runner.invoke(app, ["sample", "--teacher", str(folders["sana"]), "--adapter", str(adapter), "--prompt",
                                 "a cat", "-n", "1", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote 1 one-step image to {out}" in " ".join(result.output.split()) and out.is_file()
