"""Teacher families: the registry, typed Teacher fields, refusals, and a new family as one class plus registration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.teachers import teacher as teacher_module  # noqa: E402
from wadi_distill.teachers.families import (BuiltinDigits, Flux, PixArt, Sana, StableDiffusion, StableDiffusion3,  # noqa: E402
                                            StableDiffusionXL)
from wadi_distill.teachers.pipeline import TEACHER_FAMILIES, load_teacher  # noqa: E402
from wadi_distill.teachers.teacher import TextEncoders, register_family  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402


def test_every_family_is_registered_once_by_name():
    assert TEACHER_FAMILIES == {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "pixart": PixArt,
                                "sd3": StableDiffusion3, "builtin": BuiltinDigits, "sana": Sana, "flux": Flux}
    with pytest.raises(ValueError, match="registered already"):
        register_family(StableDiffusion)


def test_typed_fields_of_loaded_teachers(tmp_path):
    sd = load_teacher(make_pipeline(tmp_path / "sd", "sd"))
    assert isinstance(sd.family, StableDiffusion) and sd.call is sd.family
    assert sd.pipeline_class == "StableDiffusionPipeline" and sd.image_size == sd.family.image_size == 16
    assert isinstance(sd.text_encoders, TextEncoders) and sd.default_prompts is None and sd.builtin is None
    before = sd.encode_prompts(["a cat"])
    sd.free_text_encoders()
    assert sd.text_encoders is None and before.encoder_hidden_states.shape[0] == 1
    digits = load_teacher("builtin:digits")
    assert isinstance(digits.family, BuiltinDigits) and not digits.family.weights_on_disk
    assert digits.pipeline_class is None and digits.text_encoders is None
    assert digits.default_prompts == list(digits.builtin.class_prompts) and len(digits.default_prompts) == 10


def test_a_pipeline_of_no_family_and_a_denoiser_a_family_cannot_call_are_refused(tmp_path):
    folder = make_pipeline(tmp_path / "sd", "sd")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    with pytest.raises(WadiInputError, match="CogVideoXPipeline in .* is not supported; wadi-distill supports "
                                             "StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtAlphaPipeline"):
        load_teacher(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(WadiInputError, match="needs a UNet with addition_embed_type='text_time'"):
        load_teacher(folder, load_text_encoders=False)


def test_a_new_family_is_one_class_and_its_registration(tmp_path, monkeypatch):
    """A family for another pipeline class: registered, load_teacher finds it and calls through it."""
    monkeypatch.setattr(teacher_module, "TEACHER_FAMILIES", dict(TEACHER_FAMILIES))
    calls = []

    @teacher_module.register_family
    class Scaled(StableDiffusion):
        name = "scaled-sd"
        pipeline_classes = ("ScaledDiffusionPipeline",)

        def __call__(self, model, x_t, t, cond):
            calls.append(tuple(x_t.shape))
            return 2.0 * super().__call__(model, x_t, t, cond)

    folder = make_pipeline(tmp_path / "sd", "sd")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ScaledDiffusionPipeline"}))
    import wadi_distill.teachers.pipeline as pipeline

    monkeypatch.setattr(pipeline, "TEACHER_FAMILIES", teacher_module.TEACHER_FAMILIES)  # its imported name
    teacher = load_teacher(folder)
    assert type(teacher.family) is Scaled
    plain = load_teacher(make_pipeline(tmp_path / "plain", "sd"))
    cond = teacher.encode_prompts(["a cat"])
    x, t = torch.randn(1, *teacher.latent_shape), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(teacher.call(teacher.denoiser, x, t, cond),
                                   2.0 * plain.call(plain.denoiser, x, t, cond))
    assert calls == [(1, *teacher.latent_shape)]
