"""builtin:digits: prompt encoding, the shipped teacher offline, save/load round trips, sampling, training, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from wadi_distill.builtin.digits.data import load_split, split_indices
from wadi_distill.builtin.digits.model import (
    DigitsModel, build_teacher, is_builtin, load_builtin, load_digits, load_teacher_dir, save_teacher,
)
from wadi_distill.sample import sample_multistep
from wadi_distill.digits_demo.teacher_training import TeacherTrainingConfig, train_teacher
from wadi_probe.errors import WadiInputError

TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 8, "attention_head_dim": 4, "norm_num_groups": 4,
}
TINY_TEXT = {"embedding_dim": 8, "max_length": 8}


@pytest.fixture
def tiny_teacher() -> DigitsModel:
    return build_teacher(TINY_UNET, TINY_TEXT, seed=0).eval()


def test_split_is_disjoint_stratified_and_fixed():
    parts = split_indices()
    assert {k: len(v) for k, v in parts.items()} == {"train": 1197, "reference": 300, "test": 300}
    assert not set(parts["train"]) & set(parts["reference"]) and not set(parts["reference"]) & set(parts["test"])
    assert not set(parts["train"]) & set(parts["test"])
    assert torch.bincount(load_split("test").labels).tolist() == [30] * 10
    assert all((a == b).all() for a, b in zip(parts.values(), split_indices().values()))
    images = load_split("reference").images
    assert images.shape == (300, 1, 8, 8) and images.min() == -1.0 and images.max() == 1.0


def test_prompt_encoding(tiny_teacher):
    emb = tiny_teacher.encode_prompts(["a handwritten digit 7", "a handwritten digit seven", "", "3"])
    assert emb.shape == (4, 8, 8)
    torch.testing.assert_close(emb[0], emb[1])  # numeral and word share a token
    assert not torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[3])
    assert tiny_teacher.class_prompts[7] == "a handwritten digit 7"
    with pytest.raises(WadiInputError, match="'cat'"):
        tiny_teacher.encode_prompts(["a handwritten cat"])
    with pytest.raises(WadiInputError, match="at most"):
        tiny_teacher.encode_prompts(["a handwritten digit 7 7 7 7"])
    with pytest.raises(WadiInputError, match="0..9"):
        tiny_teacher.prompts_for_class(10)


def test_save_load_round_trip(tiny_teacher, tmp_path):
    save_teacher(tiny_teacher, tmp_path / "t", metadata={"seed": 3}, dtype=torch.float32)
    loaded = load_digits(tmp_path / "t")
    for a, b in zip(tiny_teacher.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    emb = tiny_teacher.encode_prompts(["7", ""])
    torch.testing.assert_close(loaded.encode_prompts(["7", ""]), emb, rtol=0, atol=0)
    torch.testing.assert_close(loaded.unet(x, t, emb).sample, tiny_teacher.unet(x, t, emb).sample)
    assert loaded.metadata["seed"] == 3


def test_load_refuses_bad_folders(tmp_path):
    with pytest.raises(WadiInputError, match="not a digits teacher folder"):
        load_teacher_dir(tmp_path)
    with pytest.raises(WadiInputError, match="No teacher"):
        load_digits(tmp_path / "missing")
    with pytest.raises(WadiInputError, match="no built-in model"):
        load_builtin("builtin:cats")


def test_shipped_teacher_loads_offline_with_an_sd_like_schedule():
    assert is_builtin("builtin:digits") and not is_builtin("digits") and not is_builtin("builtin:cats")
    teacher = load_builtin("builtin:digits")
    cfg = teacher.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "scaled_linear", "epsilon")
    assert (cfg.beta_start, cfg.beta_end) == (0.00085, 0.012)
    assert float(teacher.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)  # SD's alpha_bar_T
    assert (teacher.image_size, teacher.channels) == (8, 1)
    assert teacher.unet.dtype == torch.float32
    assert teacher.unet.config.cross_attention_dim == teacher.encode_prompts([""]).shape[-1]
    assert "command" in teacher.metadata and "data_split" in teacher.metadata
    params = sum(p.numel() for p in teacher.unet.parameters())
    assert 300_000 < params < 1_100_000


def test_shipped_teacher_denoises_held_out_digits_better_than_chance():
    teacher = load_builtin("digits")
    test = load_split("test")
    g = torch.Generator().manual_seed(0)
    x0, eps = test.images[:64], torch.randn(64, 1, 8, 8, generator=g)
    t = torch.full((64,), 500)
    a = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        pred = teacher.unet(xt, t, teacher.encode_prompts(teacher.prompts_for_labels(test.labels[:64]))).sample
    assert torch.mean((pred - eps) ** 2) < 0.2  # predicting zero would give 1.0


def test_sampling_is_seeded_and_cfg_one_skips_the_null_pass(tiny_teacher):
    prompts = tiny_teacher.prompts_for_labels([1, 2, 3])
    a = sample_multistep(tiny_teacher, prompts, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    b = sample_multistep(tiny_teacher, prompts, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1.0
    c = sample_multistep(tiny_teacher, prompts, steps=3, cfg=1.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a, c)
    with pytest.raises(WadiInputError, match="at least 1"):
        sample_multistep(tiny_teacher, prompts, steps=0)


def test_teacher_training_is_seeded_and_learns():
    data = load_split("train")
    images, labels = data.images[:64], data.labels[:64]

    def run(seed, steps):
        teacher = build_teacher(TINY_UNET, TINY_TEXT, seed=seed)
        return train_teacher(TeacherTrainingConfig(steps=steps, batch_size=16, warmup_steps=5, seed=seed),
                             teacher=teacher, progress=False, log_every=5, train_images=images, train_labels=labels)

    first, second = run(0, 8), run(0, 8)
    assert first.losses == second.losses
    for a, b in zip(first.teacher.unet.parameters(), second.teacher.unet.parameters()):
        assert torch.equal(a, b)
    longer = run(0, 40)
    assert longer.losses[:1] == first.losses[:1]  # same seed, same first batches
    assert sum(longer.losses[-2:]) < sum(longer.losses[:2])
    with pytest.raises(WadiInputError, match="one label"):
        train_teacher(TeacherTrainingConfig(steps=1), train_images=images, train_labels=labels[:3], progress=False)


def test_train_teacher_cli_writes_a_loadable_teacher_and_refuses_a_file(tmp_path):
    from wadi_distill.cli import app

    runner = CliRunner()
    out = tmp_path / "teacher"
    result = runner.invoke(app, ["train-teacher", "-o", str(out), "--steps", "2", "--batch-size", "4", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "digits_teacher.json").read_text())
    assert record["command"].startswith("wadi-distill train-teacher") and record["seed"] == 0
    assert record["data_split"]["sizes"]["train"] == 1197
    assert load_digits(out).image_size == 8

    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = runner.invoke(app, ["train-teacher", "-o", str(blocker), "--steps", "1", "--no-evaluate"])
    assert result.exit_code == 2 and "is a file; give a folder" in result.output
    assert blocker.read_text() == "keep me"
