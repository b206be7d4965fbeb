"""Scores on K noise sets: mean and sd over the sets (the evaluation noise), in the library, the CLI and the demo."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wadi_distill.cli import app
from wadi_distill.evaluation.noise import score_noise_sets, summarize_noise_sets
from wadi_probe.errors import WadiInputError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A merged digits student: the teacher's weights with a small seeded change in every matrix."""
    from safetensors.torch import save_file

    from wadi_distill.teachers.pipeline import load_teacher

    generator = torch.Generator().manual_seed(3)
    state = load_teacher("builtin:digits").denoiser.state_dict()
    changed = {k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=generator) if v.ndim >= 2 else v).contiguous()
               for k, v in state.items()}
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    save_file(changed, path)
    return path


def test_the_summary_is_numpys_mean_and_sample_sd_per_metric():
    per_set = [{"fd": 10.0, "recall": 0.5, "acc": None, "num_images": 7},
               {"fd": 14.0, "recall": 0.25, "acc": None, "num_images": 7},
               {"fd": 9.0, "recall": 0.75, "acc": None, "num_images": 7}]
    summary = summarize_noise_sets(per_set, 7, [0, 7, 14])
    assert summary["noise_sets"] == 3 and summary["images_per_set"] == 7 and summary["first_seeds"] == [0, 7, 14]
    assert summary["metrics"]["fd"] == {"mean": 11.0, "sd": pytest.approx(np.std([10, 14, 9], ddof=1)),
                                        "values": [10.0, 14.0, 9.0]}
    assert summary["metrics"]["fd"]["sd"] == pytest.approx(np.sqrt(7.0))  # ((1 + 9 + 4) / 2) ** 0.5
    assert summary["metrics"]["acc"] is None and "num_images" not in summary["metrics"]
    one = summarize_noise_sets(per_set[:1], 7, [0])
    assert one["metrics"]["fd"] == {"mean": 10.0, "sd": None, "values": [10.0]}
    seen = []
    score_noise_sets(lambda start: seen.append(start) or {"fd": float(start)}, 4, 25, first=3)
    assert seen == [3, 28, 53, 78]
    for bad in (0, -2):
        with pytest.raises(WadiInputError, match=f"at least 1, not {bad}"):
            score_noise_sets(lambda start: {}, bad, 25)


def test_digits_noise_sets_score_each_set_on_its_own_seeds(student):
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.digits_demo.demo import (
        eval_labels, eval_seeds, one_step_digits, score_one_step_digits,
    )
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.one_step import load_student

    summary = score_one_step_digits(student, noise_sets=3, per_class=3, seed=2)
    assert summary["noise_sets"] == 3 and summary["images_per_set"] == 30 and summary["first_seeds"] == [0, 30, 60]
    seeds = [s for start in summary["first_seeds"] for s in eval_seeds(30, 2, start)]
    assert len(set(seeds)) == 90  # no noise seed is used twice
    bundle, unet = load_student("builtin:digits", merged=student)
    labels, reference = eval_labels(3), load_split("reference")
    direct = [evaluate_images(one_step_digits(bundle, unet, labels, 2, offset=start), labels, reference)
              for start in (0, 30, 60)]
    for key in ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy"):
        values = [d[key] for d in direct]
        entry = summary["metrics"][key]
        assert entry["values"] == pytest.approx(values, rel=1e-12), key
        assert entry["mean"] == pytest.approx(np.mean(values)) and entry["sd"] == pytest.approx(np.std(values, ddof=1))
    assert len(set(summary["metrics"]["fd_features"]["values"])) == 3  # new noise, new score
    # set 0 is the single-set score, and the teacher's own one-step sample is another generator
    assert score_one_step_digits(student, noise_sets=1, per_class=3, seed=2)["metrics"]["fd_features"]["values"] == \
        pytest.approx(summary["metrics"]["fd_features"]["values"][:1])
    teacher = score_one_step_digits(None, noise_sets=2, per_class=3, seed=2)
    assert teacher["metrics"]["fd_features"]["values"][0] != pytest.approx(direct[0]["fd_features"])


def test_evaluate_noise_sets_prints_and_records_the_sd(student, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a handwritten digit {k}\n" for k in range(10) for _ in range(2)))
    common = ["--teacher", "builtin:digits", "--merged", student, "--prompts", prompts, "--device", "cpu", "--seed", 5]
    result = run("evaluate", *common, "--noise-sets", 3, "-o", tmp_path / "k3.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "k3.json").read_text())
    noise = record["noise"]
    assert noise["noise_sets"] == 3 and noise["images_per_set"] == 20 and noise["first_seeds"] == [5, 25, 45]
    assert [g["seeds"] for g in record["generation"]] == [[5, 24], [25, 44], [45, 64]]
    fd = noise["metrics"]["fd_features"]
    assert fd["sd"] == pytest.approx(np.std(fd["values"], ddof=1)) and fd["sd"] > 0
    assert record["metrics"]["fd_features"] == pytest.approx(np.mean(fd["values"]))
    assert f"feature FD {fd['mean']:.1f} ± {fd['sd']:.1f} (evaluation noise, sd over 3 noise sets of 20 images)" \
        in said(result)
    assert "3 noise sets of 20 images vs 300 reference images" in said(result)
    for k in range(3):
        assert len(list((tmp_path / "k3-images" / f"set-{k}").glob("*.png"))) == 20
    # one set (the default) is today's record, and it is set 0 of the three
    single = run("evaluate", *common, "-o", tmp_path / "k1.json")
    assert single.exit_code == 0, single.output
    one = json.loads((tmp_path / "k1.json").read_text())
    assert "noise" not in one and "±" not in said(single).replace("(±std", "")
    assert one["metrics"]["fd_features"] == pytest.approx(fd["values"][0], rel=1e-12)


def test_bad_noise_sets_are_one_sentence_exit_2_and_write_nothing(student, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten digit 1\n" * 8)
    out = tmp_path / "bad.json"
    for bad in (0, -1):
        result = run("evaluate", "--teacher", "builtin:digits", "--merged", student, "--prompts", prompts,
                     "--noise-sets", bad, "-o", out)
        assert result.exit_code == 2 and said(result) == f"error: the number of noise sets must be at least 1, not {bad}."
    images = tmp_path / "imgs"
    images.mkdir()
    result = run("evaluate", "--images", images, "--reference", "builtin:digits", "--noise-sets", 2, "-o", out)
    assert result.exit_code == 2 and "--noise-sets needs images generated here (--teacher)" in said(result)
    assert said(result).count(". ") == 0 and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "bad-images").exists()


def test_the_demo_table_shows_the_noise_beside_each_score_within_80_columns():
    import io

    from rich.console import Console

    from wadi_distill.cli.demo import noise_footnote, results_table
    from wadi_distill.digits_demo.demo import METRIC_KEYS, metrics_markdown

    def row(key, name, value, sd, sets, images):
        return {"key": key, "name": name, "steps_per_image": 1, "noise_sets": sets, "num_images": images,
                **{k: value for k in METRIC_KEYS}, **{f"{k}_sd": sd for k in METRIC_KEYS}}

    rows = [row("real", "held-out real digits (test split)", 0.5, None, 1, 300),
            row("teacher_one_step", "teacher, one step", 64.25, 0.75, 5, 1000),
            row("lorad_student", "LoRaD-from-probe VSD student, one step", 45.5, 1.125, 5, 1000)]
    buffer = io.StringIO()
    Console(file=buffer, width=80).print(results_table(rows))
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "64.25" in text and "±0.75" in text and "±1.12" in text and text.count("±") == 2 * len(METRIC_KEYS)
    assert noise_footnote(rows) == ("each score is the mean over 5 noise sets of 1000 images; ± is the evaluation "
                                    "noise, the sd over the sets (the mean moves about ± / √5); held-out real digits "
                                    "(test split): one fixed set, no ±.")
    assert noise_footnote(rows[:1]) is None
    markdown = metrics_markdown(rows)
    assert "**45.50** ± 1.12" in markdown and "| 64.25 ± 0.75 |" in markdown and "| 0.50 |" in markdown


def test_the_demo_footnote_says_which_rows_have_which_set_size():
    from wadi_distill.cli.demo import noise_footnote

    rows = [{"name": "held-out real digits (test split)", "steps_per_image": "–", "noise_sets": 1, "num_images": 300},
            {"name": "teacher, DDIM 25 steps + CFG 2", "steps_per_image": 50, "noise_sets": 5, "num_images": 1000},
            {"name": "teacher, one step", "steps_per_image": 1, "noise_sets": 5, "num_images": 5000},
            {"name": "LoRaD-from-probe VSD student, one step", "steps_per_image": 1, "noise_sets": 5,
             "num_images": 5000}]
    assert noise_footnote(rows) == (
        "each score is the mean over 5 noise sets of 1000 images for the multi-step teacher and 5 noise sets of "
        "5000 images for the one-step models; ± is the evaluation noise, the sd over the sets (the mean moves about "
        "± / √5); held-out real digits (test split): one fixed set, no ±.")
