"""The Flux.1 family: FluxPipeline's own prompt encoding, packing, one step and dynamic shift reproduced; weight
variants and shards; the embedded guidance per VSD role; the paper preset's layers; plans from probe reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline, tiny_flux  # noqa: E402

from wadi_distill.teachers.families import Flux  # noqa: E402
from wadi_distill.teachers.pipeline import load_teacher  # noqa: E402
from wadi_distill.teachers.sampling import one_step_generate  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a cat", "a red house on the tree", ""]


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    return {"dev": make_pipeline(root / "dev", "flux"), "schnell": make_pipeline(root / "schnell", "flux-schnell")}


def _pipeline(root: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(root, local_files_only=True)


def test_encoding_equals_flux_pipeline_encode_prompt(flux):
    pipe = _pipeline(flux["dev"])
    ours = load_teacher(flux["dev"], load_vae=False).encode_prompts(PROMPTS)
    with torch.no_grad():
        hidden, pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")  # max_sequence_length 512
    assert hidden.shape == (3, 512, 16) and pooled.shape == (3, 16)
    assert torch.equal(hidden, ours.encoder_hidden_states) and torch.equal(pooled, ours.pooled)
    assert torch.equal(text_ids, torch.zeros(512, 3)) and ours.attention_mask is None


def test_packing_and_positions_equal_the_pipeline_static_methods():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 10)
    tokens = Flux.pack(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 10)) and tokens.shape == (2, 15, 16)
    assert torch.equal(Flux.unpack(tokens, 6, 10), x)
    assert torch.equal(Flux.unpack(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8))
    ids = Flux.image_ids(6, 10, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 2.0]  # token 7: row 1, column 2 of the 3 × 5 patches


def test_one_step_and_shift_equal_flux_pipeline(flux):
    """The student's one-step sample x̂0 = z − v(z, σ=1) is FluxPipeline's one Euler step from the same z."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = _pipeline(flux["dev"])
    teacher = load_teacher(flux["dev"])
    assert teacher.latent_shape == (4, 8, 8) and teacher.image_size == 16
    config = pipe.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    assert teacher.schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)  # 16 tokens of 2×2 latent patches
    cond = teacher.encode_prompts(PROMPTS[:2])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = one_step_generate(teacher.denoiser, teacher.call, teacher.schedule, cond, z)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond.encoder_hidden_states, pooled_prompt_embeds=cond.pooled,
                      latents=Flux.pack(z), num_inference_steps=1, height=16, width=16, output_type="latent",
                      guidance_scale=3.5).images
    torch.testing.assert_close(Flux.pack(ours), theirs, rtol=0, atol=1e-5)
    # the decoder undoes the VAE's scaling and shift as the pipeline does before vae.decode
    images = teacher.decode(ours)
    with torch.no_grad():
        expected = pipe.vae.decode(ours / 0.3611 + 0.1159, return_dict=False)[0]
    torch.testing.assert_close(images, ((expected + 1) / 2).clamp(0, 1))


def test_weight_variants_and_shards_load_the_same_teacher(flux, tmp_path):
    plain = load_teacher(flux["dev"], load_text_encoders=False).denoiser.state_dict()
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        folder = make_pipeline(tmp_path / variant, "flux", variant=variant)
        assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
            "config.json", f"diffusion_pytorch_model.{variant}.safetensors"]
        teacher = load_teacher(folder)
        state = teacher.denoiser.state_dict()
        assert all(torch.equal(state[k].to(dtype), plain[k].to(dtype)) for k in plain)
        assert teacher.encode_prompts(["a cat"]).encoder_hidden_states.shape == (1, 512, 16)
    sharded = make_pipeline(tmp_path / "sharded", "flux")
    model = load_teacher(sharded, load_text_encoders=False).denoiser
    (sharded / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    model.save_pretrained(sharded / "transformer", max_shard_size="40KB")
    shards = sorted(p.name for p in (sharded / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    state = load_teacher(sharded, load_text_encoders=False).denoiser.state_dict()
    assert all(torch.equal(state[k], plain[k]) for k in plain)


def test_embedded_guidance_per_role_and_refused_where_there_is_none(flux):
    dev = load_teacher(flux["dev"], load_vae=False)
    family = dev.family
    assert (family.guidance, dev.call.guidance, family.default_cfg) == (3.5, 3.5, 1.0)
    family.set_guidance(5.0)
    assert family.for_role("teacher") is family and family.for_role("fake") is family
    assert family.for_role("student").guidance == 3.5 and dev.call.guidance == 3.5 and family.guidance == 5.0
    cond = dev.encode_prompts(["a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.7])
    with torch.no_grad():
        real = family(dev.denoiser, x, t, cond)
        student = dev.call(dev.denoiser, x, t, cond)
        embedded = dev.denoiser(hidden_states=Flux.pack(x), encoder_hidden_states=cond.encoder_hidden_states,
                                pooled_projections=cond.pooled, timestep=t, img_ids=Flux.image_ids(8, 8, "cpu", x.dtype),
                                txt_ids=torch.zeros(512, 3), guidance=torch.tensor([5.0]), return_dict=False)[0]
    assert torch.equal(real, Flux.unpack(embedded, 8, 8)) and not torch.allclose(real, student)
    with pytest.raises(WadiInputError, match="guidance must be a non-negative number"):
        family.set_guidance(-1.0)
    schnell = load_teacher(flux["schnell"], load_text_encoders=False, load_vae=False)
    assert schnell.family.guidance is None and schnell.schedule.shift == 1.0  # no dynamic shift
    with pytest.raises(WadiInputError, match=r"This flux teacher has no guidance embedding, so a guidance value "
                                             r"\(2\) does not apply to it; leave --guidance out\.$"):
        schnell.family.set_guidance(2.0)
    schnell.family.set_guidance(None)  # nothing asked, nothing refused


def test_folders_that_do_not_fit_are_refused_in_one_sentence(flux, tmp_path):
    import shutil

    broken = tmp_path / "no-t5"
    shutil.copytree(flux["dev"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["text_encoder_2"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WadiInputError, match=r"^The pipeline in .* has no 'text_encoder_2' component\.$"):
        load_teacher(broken)
    other = tmp_path / "vae"
    shutil.copytree(flux["dev"], other)
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(WadiInputError, match="takes 4 latent channels .* but its VAE makes 16"):
        load_teacher(other, load_vae=False, load_text_encoders=False)  # read from vae/config.json alone


def test_paper_preset_takes_every_linear_of_both_block_kinds_with_the_modulation():
    from wadi_distill.plan import plan_from_preset

    model = tiny_flux()
    paper = plan_from_preset(model, 2, "paper")
    double = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
    assert sorted(e.module for e in paper.layers) == sorted(
        [f"transformer_blocks.0.{n}" for n in double] + [f"single_transformer_blocks.0.{n}" for n in single])
    outside = {name for name, _ in paper.skipped}
    assert outside == {"time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                       "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                       "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
                       "context_embedder", "x_embedder", "norm_out.linear", "proj_out"}
    assert len(plan_from_preset(model, 2, "all-linear").layers) == len(paper.layers) + len(outside)
    # proj_out of a single block reads attention and MLP together: 16 + 64 inputs, r·(out + ⌊in/2⌋) numbers
    entry = next(e for e in paper.layers if e.module == "single_transformer_blocks.0.proj_out")
    assert entry.shape == (16, 80) and entry.params == 2 * (16 + 40)


def test_a_plan_from_a_probe_report_of_a_flux_fine_tune(flux, tmp_path):
    """The probe compares the teacher with a fine-tune rotated in two layers; the plan adapts exactly those."""
    from wadi_distill.plan import plan_from_report
    from wadi_probe.analyze import compare
    from wadi_probe.rotation import rotate_pairs

    teacher = load_teacher(flux["dev"], load_text_encoders=False, load_vae=False).denoiser
    student = type(teacher).from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(0)
    rotated = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]
    modules = dict(student.named_modules())
    with torch.no_grad():
        for name in rotated:
            weight = modules[name].weight
            theta = 0.3 * torch.randn(weight.shape[0], 1, generator=g) @ torch.randn(1, weight.shape[1] // 2, generator=g)
            weight.copy_(rotate_pairs(weight, theta))
    student.save_pretrained(tmp_path / "fine-tune")
    report = compare(flux["dev"], tmp_path / "fine-tune", device="cpu")
    report.save(tmp_path / "report.json")
    kinds = {row["module"]: row.get("layer_type") for row in json.loads((tmp_path / "report.json").read_text())["layers"]}
    assert kinds["single_transformer_blocks.0.proj_mlp"] == "feed-forward"
    plan = plan_from_report(teacher, json.loads((tmp_path / "report.json").read_text()), budget=1.0,
                            min_rank=1, multiple_of=1)
    assert sorted(e.module for e in plan.layers) == sorted(rotated) and all(e.rank == 1 for e in plan.layers)


def test_paper_preset_at_flux_dev_size_on_the_meta_device():
    """FLUX.1-dev's shapes (diffusers' defaults): 19 × 14 + 38 × 6 layers, r·(out + ⌊in/2⌋) each, by hand."""
    from diffusers import FluxTransformer2DModel

    from wadi_distill.plan import plan_from_preset

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    plan = plan_from_preset(model, 256, "paper")
    d, mlp = 3072, 4 * 3072
    double = 2 * (6 * d + d // 2) + 8 * (d + d // 2) + 2 * (mlp + d // 2) + 2 * (d + mlp // 2)
    single = (3 * d + d // 2) + (mlp + d // 2) + (d + (d + mlp) // 2) + 3 * (d + d // 2)
    assert len(plan.layers) == 19 * 14 + 38 * 6 == 494
    assert plan.trainable_params == 256 * (19 * double + 38 * single) == 1_075_838_976
    assert plan.backbone_params == 11_901_408_320 and round(100 * plan.fraction, 2) == 9.04
