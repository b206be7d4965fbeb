"""Refusals say what is true, stay one readable line for any input, and count in the singular for one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from wadi_distill.cli import app as distill_app
from wadi_probe.cli import app as probe_app
from wadi_probe.errors import WadiInputError
from wadi_probe.text import plural, quoted

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "reports" / "demo"


def distill(*args):
    return CliRunner().invoke(distill_app, [str(a) for a in args])


def probe(*args):
    return CliRunner().invoke(probe_app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())


def refused(result, sentence: str) -> None:
    assert result.exit_code == 2, result.output
    assert sentence in said(result), said(result)
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_counted_nouns_and_quoted_input():
    assert [plural(n, "student") for n in (0, 1, 2, 1234)] == ["0 students", "1 student", "2 students", "1,234 students"]
    assert quoted("a cat") == "'a cat'"
    long = "x" * 10_000_000
    assert quoted(long) == repr("x" * 80) + "… (10,000,000 characters)"


def test_a_huge_prompt_is_quoted_short():
    from wadi_distill.builtin.digits.model import load_builtin

    teacher = load_builtin()
    with pytest.raises(WadiInputError) as caught:
        teacher.encode_prompts(["a handwritten digit " + "q" * 1_000_000])
    message = str(caught.value)
    assert len(message) < 250 and "… (1,000,000 characters)" in message and "does not know the word(s)" in message
    with pytest.raises(WadiInputError) as caught:
        teacher.encode_prompts(["a handwritten digit 1 " + "one " * 50_000])
    message = str(caught.value)
    assert len(message) < 250 and "(200,022 characters) has 50,004 words" in message
    with pytest.raises(WadiInputError) as caught:
        teacher.encode_prompts([" ".join(f"w{i}x" for i in range(100))])
    assert "'w0x', 'w1x', 'w2x', 'w3x', 'w4x' and 95 others;" in str(caught.value)


def test_inception_path_and_k_are_refused_with_true_sentences(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    needed = "give --inception FILE, an InceptionV3 weights file for FID"
    refused(distill("evaluate", "--images", folder, "--reference", folder, "--inception", tmp_path / "nope"),
            f"{tmp_path / 'nope'} does not exist: {needed}")
    refused(distill("evaluate", "--images", folder, "--reference", folder, "--inception", folder),
            f"{folder} is a folder; {needed}")
    refused(distill("evaluate", "--images", folder, "--reference", "builtin:digits", "--k", "0"),
            "k (the neighbours of precision/recall) must be at least 1, not 0.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_an_adapter_given_as_a_full_model_is_told_where_it_goes(tmp_path):
    adapter, full = DEMO / "lorad_student", DEMO / "full_student.safetensors"
    refused(probe("compare", adapter, full, "-o", tmp_path / "r.json"),
            f"the teacher {adapter} is an adapter (LoRA/LoRaD weights), not a full model; give the teacher's full "
            "weights as TEACHER and the adapter as a STUDENT")
    refused(probe("swap", "builtin:digits", adapter, "--take", "norm", "-o", tmp_path / "h.safetensors"),
            f"the student {adapter} is an adapter (LoRA/LoRaD weights), not a full model; a hybrid takes the full "
            "weights of both")
    assert list(tmp_path.iterdir()) == []


def test_export_takes_the_builtin_teacher_by_name(tmp_path):
    out = tmp_path / "student.safetensors"
    result = distill("export", "--teacher", "builtin:digits", "--adapter", DEMO / "lorad_student", "-o", out)
    assert result.exit_code == 0, result.output
    merged = load_file(str(out))
    teacher = load_file(str(ROOT / "wadi_distill" / "builtin" / "digits" / "digits_unet.safetensors"))
    assert set(merged) == set(teacher) and any(not (merged[k] == teacher[k]).all() for k in teacher)
    refused(distill("export", "--teacher", "builtin:nope", "--adapter", DEMO / "lorad_student", "-o", tmp_path / "x.safetensors"),
            "builtin:nope is not a built-in checkpoint; the built-in ones are builtin:digits.")


def test_a_recorded_training_teacher_that_is_no_model_is_named_with_its_source(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(DEMO / "lorad_student", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = distill("export", "--teacher", "builtin:digits", "--adapter", adapter, "-o", tmp_path / "s.safetensors")
    assert result.exit_code == 0, result.output
    assert (f"the adapter's training teacher {tmp_path / 'empty'} (from {adapter / 'adapter_config.json'}'s "
            f"base_model_name_or_path) cannot be read ({tmp_path / 'empty'} holds no model weights") in said(result)
    assert (tmp_path / "s.safetensors").is_file()


def test_a_path_that_is_not_utf8_is_said_to_be_so(tmp_path):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/st\xff.safetensors")
    try:
        shutil.copyfile(DEMO / "full_student.safetensors", name)
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    sentence = (f"the path {tmp_path}/st\\xff.safetensors is not valid UTF-8, and the safetensors library opens only "
                "UTF-8 paths")
    refused(probe("compare", "builtin:digits", name, "-o", tmp_path / "r.json"), sentence)
    refused(distill("sample", "--teacher", "builtin:digits", "--merged", name, "--prompt", "3", "-o", tmp_path / "s.png"),
            sentence)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "s.png").exists()


def test_the_demo_table_keeps_its_headers_and_model_names_at_80_columns():
    import io

    from rich.console import Console

    from wadi_distill.cli.demo import results_table

    rows = json.loads((DEMO / "metrics.json").read_text())["rows"]
    buffer = io.StringIO()
    Console(file=buffer, width=80).print(results_table(rows))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in buffer.getvalue()
    words = buffer.getvalue().split()
    for text in ("steps/ image", "FD pixel ↓", "FD features ↓", "precision ↑", "recall ↑", "class accuracy ↑",
                 *(row["name"] for row in rows)):
        assert all(word in words for word in text.split()), text
    last_column = f"{rows[-1]['class_accuracy']:.3f}"
    widest = max((f"{row[key]:.2f}" for row in rows for key in ("fd_pixel", "fd_features")), key=len)
    assert last_column in words and widest in words  # the last column and the widest number are there


def test_an_empty_label_and_two_refusals_in_one_sentence(tmp_path):
    full, adapter = DEMO / "full_student.safetensors", DEMO / "lorad_student"
    refused(probe("compare", "builtin:digits", full, adapter, "--label", "", "--label", "b", "-o", tmp_path / "d"),
            "a label must not be empty")
    (tmp_path / "b1.safetensors").write_bytes(b"garbage")
    (tmp_path / "b2.safetensors").write_bytes(b"garbage2")
    result = probe("compare", "builtin:digits", tmp_path / "b1.safetensors", tmp_path / "b2.safetensors",
                   "-o", tmp_path / "d", "--no-progress")
    refused(result, "no student could be compared: b1: ")
    assert ".;" not in said(result) and said(result).endswith(".")
    assert not (tmp_path / "d").exists()


def test_no_progress_silences_the_loading_bars_of_transformers_and_diffusers(tmp_path, capfd):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_pipelines import make_pipeline
    from wadi_distill.teachers.pipeline import load_teacher

    pipe = make_pipeline(tmp_path / "sd", "sd")
    capfd.readouterr()
    load_teacher(pipe, progress=True)
    shown = capfd.readouterr().err
    load_teacher(pipe, progress=False)
    silent = capfd.readouterr().err
    assert "Loading" in shown or "it/s" in shown  # the libraries' own bars, when allowed
    assert "Loading" not in silent and "it/s" not in silent
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # the switch is restored afterwards


def test_a_feature_network_that_fails_on_images_is_one_sentence(tmp_path):
    import torch

    class FloatOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).flatten(1)

    torch.jit.script(FloatOnly()).save(str(tmp_path / "net.pt"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    refused(distill("evaluate", "--images", folder, "--reference", folder, "--features", tmp_path / "net.pt",
                    "-o", tmp_path / "r.json"),
            f"{tmp_path / 'net.pt'} fails on a uint8 image batch (B, 3, H, W) (RuntimeError: ")
    assert not (tmp_path / "r.json").exists()


def test_a_csv_header_of_a_million_characters_is_not_repeated(tmp_path):
    from wadi_distill.teachers.prompts import load_prompts

    path = tmp_path / "wide.csv"
    path.write_text("id," + ",".join(f"column{i:07d}" for i in range(80_000)) + "\n1,a\n")
    with pytest.raises(WadiInputError) as caught:
        load_prompts(path, column="caption")
    message = str(caught.value)
    assert len(message) < 400 and "'column0000008' and 79,991 others)." in message
    assert said(distill("sample", "--teacher", "builtin:digits", "--prompt", "1", "--device", "x" * 500)).endswith(
        f"unknown device {'x' * 80!r}… (500 characters); use auto, cpu or cuda.")
