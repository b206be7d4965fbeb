"""load_lorad: one call puts a trained LoRaD onto a diffusers pipeline; fuse/unfuse/unload around it."""

import pytest
import torch

from tiny_pipelines import make_pipeline
from wadi_distill.lorad import inject_lorad, load_lorad, lorad_layers, save_adapter
from wadi_distill.plan import plan_from_preset
from wadi_probe.errors import WadiInputError


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _unet_out(unet):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 7, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SD pipeline folder and a run folder OUT/final with a non-trivial LoRaD student for it."""
    root = tmp_path_factory.mktemp("load_lorad")
    make_pipeline(root / "teacher", "sd")
    pipe = _pipeline(root / "teacher")
    plan = plan_from_preset(pipe.unet, 2)
    inject_lorad(pipe.unet, plan, adapter_name="student", init="random", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in lorad_layers(pipe.unet).values():
            layer.lorad_A["student"].normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    student_out = _unet_out(pipe.unet)
    save_adapter(pipe.unet, root / "run" / "final", plan, adapter_name="student")
    return root, student_out, plan


def test_load_lorad_runs_the_student_and_fuse_unfuse_round_trip(trained):
    root, student_out, plan = trained
    pipe = _pipeline(root / "teacher")
    teacher_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    teacher_out = _unet_out(pipe.unet)
    lorad = load_lorad(pipe, root / "run")  # the run folder: its final/ adapter is found
    assert lorad.path == root / "run" / "final" and lorad.config.ranks() == plan.ranks() and not lorad.fused
    assert torch.equal(_unet_out(pipe.unet), student_out)
    assert not torch.allclose(student_out, teacher_out, atol=1e-4)

    lorad.fuse()
    assert lorad.fused
    module = plan.layers[0].module
    fused_weight = lorad_layers(pipe.unet)[module].base_layer.weight
    assert not torch.equal(fused_weight, teacher_weights[f"{module}.weight"])
    torch.testing.assert_close(_unet_out(pipe.unet), student_out, rtol=0, atol=1e-6)

    lorad.unfuse()
    assert not lorad.fused
    for name, layer in lorad_layers(pipe.unet).items():
        assert torch.equal(layer.base_layer.weight, teacher_weights[f"{name}.weight"])
    assert torch.equal(_unet_out(pipe.unet), student_out)
    lorad.enable(False)
    assert torch.equal(_unet_out(pipe.unet), teacher_out)

    unet = lorad.unload()
    assert not lorad_layers(unet) and unet.state_dict().keys() == teacher_weights.keys()
    assert all(torch.equal(v, teacher_weights[k]) for k, v in unet.state_dict().items())


def test_load_lorad_fused_then_unloaded_is_a_plain_student(trained):
    root, student_out, _ = trained
    pipe = _pipeline(root / "teacher")
    lorad = load_lorad(pipe, root / "run" / "final", fuse=True)
    assert lorad.fused
    unet = lorad.unload(keep_fused=True)
    assert not lorad_layers(unet)
    torch.testing.assert_close(_unet_out(unet), student_out, rtol=0, atol=1e-6)


def test_load_lorad_refuses_another_model_and_leaves_the_pipeline_alone(trained, tmp_path):
    root, _, _ = trained
    make_pipeline(tmp_path / "sdxl", "sdxl")
    from diffusers import StableDiffusionXLPipeline

    other = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", local_files_only=True)
    before = {k: v.clone() for k, v in other.unet.state_dict().items()}
    with pytest.raises(WadiInputError, match="does not fit this base model"):
        load_lorad(other, root / "run")
    assert not lorad_layers(other.unet)
    assert all(torch.equal(before[k], v) for k, v in other.unet.state_dict().items())
    with pytest.raises(WadiInputError, match="has no unet or transformer"):
        load_lorad(object(), root / "run")
    with pytest.raises(WadiInputError, match="does not exist"):
        load_lorad(_pipeline(root / "teacher"), tmp_path / "nothing")
