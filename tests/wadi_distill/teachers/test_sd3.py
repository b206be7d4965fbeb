"""The SD3/SD3.5 family: prompt embeddings equal to StableDiffusion3Pipeline.encode_prompt (three encoders, or zeros
for a null T5), the denoiser call at σ·1000, latent shape and VAE factors, variant and sharded folders, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline, reshard  # noqa: E402

from wadi_distill.plan import plan_from_preset  # noqa: E402
from wadi_distill.schedules import FlowMatchSchedule  # noqa: E402
from wadi_distill.teachers.components import weights_variant  # noqa: E402
from wadi_distill.teachers.families import StableDiffusion3  # noqa: E402
from wadi_distill.teachers.pipeline import load_teacher  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402

PROMPTS = ["a cat", "", "a red house on the big tree in the sky", " ".join(["the small dog"] * 7)]  # 21 words: CLIP truncates

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    return {kind: make_pipeline(root / kind, kind) for kind in ("sd3", "sd35")}


def _set_index(folder: Path, **entries) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **entries}))


def _pipeline_embeddings(folder: Path, **components):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **components)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    return embeds, pooled


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_embeddings_equal_the_pipelines_encode_prompt(folders, kind):
    teacher = load_teacher(folders[kind], progress=False)
    assert type(teacher.family) is StableDiffusion3 and teacher.pipeline_class == "StableDiffusion3Pipeline"
    cond = teacher.encode_prompts(PROMPTS)
    embeds, pooled = _pipeline_embeddings(folders[kind])
    # two CLIPs of 16 tokens (16 + 16 wide, padded to T5's 40), then T5's 256 tokens; pooled 16 + 16
    assert tuple(cond.encoder_hidden_states.shape) == (4, 16 + 256, 40) and tuple(cond.pooled.shape) == (4, 32)
    assert torch.equal(cond.encoder_hidden_states, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.attention_mask is None


def test_a_null_t5_is_zeros_as_in_the_pipeline_and_a_missing_encoder_is_refused(tmp_path):
    folder = make_pipeline(tmp_path / "sd3", "sd3")
    _set_index(folder, text_encoder_3=[None, None], tokenizer_3=[None, None])
    teacher = load_teacher(folder, progress=False)
    assert len(teacher.text_encoders.encoders) == 2
    cond = teacher.encode_prompts(PROMPTS)
    embeds, pooled = _pipeline_embeddings(folder, text_encoder_3=None, tokenizer_3=None)  # the pipeline's way
    assert torch.equal(cond.encoder_hidden_states, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.encoder_hidden_states[:, 16:].abs().max() == 0 and cond.encoder_hidden_states[:, :16].abs().max() > 0

    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WadiInputError, match=r"^The pipeline in .* has no 'text_encoder_2' component\.$"):
        load_teacher(folder, progress=False)
    assert load_teacher(folder, load_text_encoders=False, progress=False).text_encoders is None  # denoiser only


def test_the_denoiser_is_called_at_sigma_times_1000_with_pooled_projections(folders):
    teacher = load_teacher(folders["sd35"], progress=False)
    assert teacher.latent_shape == (4, 8, 8) and teacher.image_size == 16  # sample_size 8, VAE factor 2
    assert isinstance(teacher.schedule, FlowMatchSchedule)
    assert teacher.schedule.shift == 3.0 and teacher.schedule.logit_normal == (0.0, 1.0)  # SD3's training draw
    cond = teacher.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = teacher.call(teacher.denoiser, x, torch.tensor([0.25, 1.0]), cond)
        scalar = teacher.call(teacher.denoiser, x, torch.tensor(0.25), cond)
        direct = teacher.denoiser(hidden_states=x, timestep=torch.tensor([250.0, 1000.0]),
                                  encoder_hidden_states=cond.encoder_hidden_states,
                                  pooled_projections=cond.pooled, return_dict=False)[0]
        at_250 = teacher.denoiser(hidden_states=x, timestep=torch.tensor([250.0, 250.0]),
                                  encoder_hidden_states=cond.encoder_hidden_states,
                                  pooled_projections=cond.pooled, return_dict=False)[0]
    assert torch.equal(ours, direct) and torch.equal(scalar, at_250) and not torch.equal(ours, at_250)
    with pytest.raises(WadiInputError, match="needs pooled text embeddings"):
        teacher.call(teacher.denoiser, x, torch.tensor(0.5), type(cond)(cond.encoder_hidden_states))


def test_decode_undoes_sd3s_vae_scaling_and_shift(folders):
    from diffusers import AutoencoderKL

    teacher = load_teacher(folders["sd3"], load_text_encoders=False, progress=False)
    vae = AutoencoderKL.from_pretrained(folders["sd3"] / "vae")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ((vae.decode(latents / 1.5305 + 0.0609).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(teacher.decode(latents), expected)


def test_bf16_variant_and_sharded_transformer_load_as_the_pipeline_does(tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = make_pipeline(tmp_path / "sd3", "sd3", variant="fp16")
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer", variant="fp16").to(torch.bfloat16)
    reshard(folder / "transformer")
    shards = list((folder / "transformer").glob("diffusion_pytorch_model.bf16-*-of-*.safetensors"))
    assert len(shards) > 2 and (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.bf16.json").is_file()
    assert weights_variant(folder / "transformer") == "bf16"  # diffusers' newer NAME.VARIANT-0000k-of-n shards
    teacher = load_teacher(folder, progress=False)
    state = teacher.denoiser.state_dict()  # read from the three bf16 shards (computed in fp32, as every teacher)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v.float()) for k, v in model.state_dict().items())
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, variant="fp16",
                                                    transformer=teacher.denoiser)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    cond = teacher.encode_prompts(PROMPTS)
    assert torch.equal(cond.encoder_hidden_states, embeds.float()) and torch.equal(cond.pooled, pooled.float())


def test_a_non_flow_scheduler_is_refused(tmp_path):
    from diffusers import DDPMScheduler

    folder = make_pipeline(tmp_path / "sd3", "sd3")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    _set_index(folder, scheduler=["diffusers", "DDPMScheduler"])
    with pytest.raises(WadiInputError, match="This sd3 teacher runs on a flow-matching scheduler .* not DDPMScheduler."):
        load_teacher(folder, load_text_encoders=False, progress=False)


def test_the_paper_preset_adapts_every_linear_of_the_joint_blocks(folders):
    """Both streams' attention (to_q/k/v/out, add_q/k/v_proj, to_add_out), SD3.5's second attention, both
    feed-forwards and the AdaLN-Zero modulation linears; the embedders, norm_out and proj_out stay frozen."""
    teacher = load_teacher(folders["sd35"], load_text_encoders=False, progress=False)
    plan = plan_from_preset(teacher.denoiser, 2)
    names = {e.module for e in plan.layers}
    block0 = {n.removeprefix("transformer_blocks.0.") for n in names if n.startswith("transformer_blocks.0.")}
    assert block0 == {"norm1.linear", "norm1_context.linear",
                      "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
    # the last block's text stream ends there (context_pre_only): no to_add_out, no ff_context
    last = {n.removeprefix("transformer_blocks.1.") for n in names if n.startswith("transformer_blocks.1.")}
    assert last == {"norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v",
                    "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                    "ff.net.0.proj", "ff.net.2"}
    skipped = {name for name, _ in plan.skipped}
    assert {"context_embedder", "norm_out.linear", "proj_out"} <= skipped and not names & skipped
