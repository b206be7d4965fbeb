"""`wadi-distill run` / `sample` on the command line: a real tiny run, and bad inputs that must not damage anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    teacher = make_pipeline(root / "sd", "sd")
    prompts = root / "prompts.csv"
    prompts.write_text("id,caption\n1,a cat\n2,a red house\n3,a dog in the sky\n")
    out = root / "run"
    result = runner.invoke(app, ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--prompt-column",
                                 "caption", "--output-dir", str(out), "--rank", "4", "--fake-rank", "2",
                                 "--max-steps", "2", "--checkpointing-steps", "1", "--batch-size", "1",
                                 "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    return {"root": root, "teacher": teacher, "prompts": prompts, "out": out, "output": result.output}


def test_run_writes_checkpoints_final_and_logs(setup):
    out = setup["out"]
    assert "trained 2 steps" in setup["output"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for name in ("adapter.safetensors", "adapter_config.json", "student.safetensors", "samples/grid.png"):
        assert (out / "final" / name).is_file(), name
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    # the adapter records the teacher it was trained on (absolute), so export can tell a fine-tune from it
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(setup["teacher"]).resolve())


def test_an_exported_adapter_finds_its_training_teacher(setup, tmp_path):
    from wadi_distill.transfer import training_teacher_of

    assert training_teacher_of(setup["out"] / "final") == str(Path(setup["teacher"]).resolve())


def _fails(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_teacher(setup, tmp_path):
    out = tmp_path / "o"
    _fails(["run", "--teacher", str(tmp_path / "nope"), "--prompts", str(setup["prompts"]), "--output-dir",
            str(out), "--rank", "4"], "does not exist")
    assert not out.exists()


def test_unsupported_pipeline(setup, tmp_path):
    folder = tmp_path / "video"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    _fails(["run", "--teacher", str(folder), "--prompts", str(setup["prompts"]), "--output-dir",
            str(tmp_path / "o"), "--rank", "4"], "CogVideoXPipeline")
    assert not (tmp_path / "o").exists()


def test_empty_prompt_file(setup, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _fails(["run", "--teacher", str(setup["teacher"]), "--prompts", str(empty), "--output-dir",
            str(tmp_path / "o"), "--rank", "4"], "contains no prompts")
    assert not (tmp_path / "o").exists()


def test_plan_for_another_model(setup, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "source": "other", "layers": [
        {"module": "transformer_blocks.0.attn1.to_q", "rank": 4, "params": 96, "shape": [24, 24]}]}))
    _fails(["run", "--teacher", str(setup["teacher"]), "--prompts", str(setup["prompts"]), "--output-dir",
            str(tmp_path / "o"), "--plan", str(plan)], "another model")
    assert not (tmp_path / "o").exists()


def test_checkpoint_from_another_run_and_existing_output(setup, tmp_path):
    out = setup["out"]
    before = _snapshot(out)
    # another plan (rank 2) cannot resume this run's checkpoint
    _fails(["run", "--teacher", str(setup["teacher"]), "--prompts", str(setup["prompts"]), "--prompt-column",
            "caption", "--output-dir", str(tmp_path / "o"), "--rank", "2", "--fake-rank", "2",
            "--resume", str(out / "checkpoint-1")], "another run")
    # same architecture, other weights: also another run
    other = make_pipeline(tmp_path / "other", "sd", seed=1)
    _fails(["run", "--teacher", str(other), "--prompts", str(setup["prompts"]), "--prompt-column",
            "caption", "--output-dir", str(tmp_path / "o3"), "--rank", "4", "--fake-rank", "2",
            "--resume", str(out / "checkpoint-1")], "another run")
    # a fresh run into a folder that holds checkpoints is refused
    _fails(["run", "--teacher", str(setup["teacher"]), "--prompts", str(setup["prompts"]), "--prompt-column",
            "caption", "--output-dir", str(out), "--rank", "4"], "already holds checkpoints")
    _fails(["run", "--teacher", str(setup["teacher"]), "--prompts", str(setup["prompts"]), "--output-dir",
            str(tmp_path / "o2"), "--rank", "4", "--resume", str(tmp_path)], "not a wadi-distill checkpoint")
    assert _snapshot(out) == before


def test_sample_adapter_and_merged_agree(setup, tmp_path):
    final = setup["out"] / "final"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["sample", "--teacher", str(setup["teacher"]), "--prompt", "a cat", "-n", "2"]
    r1 = runner.invoke(app, [*common, "--adapter", str(final), "-o", str(a)])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, [*common, "--merged", str(final / "student.safetensors"), "-o", str(b)])
    assert r2.exit_code == 0, r2.output
    ia, ib = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
    assert ia.shape == ib.shape and np.abs(ia - ib).max() <= 1
    _fails([*common, "-o", str(tmp_path / "c.png")], "exactly one of")
    assert not (tmp_path / "c.png").exists()


def test_bad_option_combinations(setup, tmp_path):
    base = ["run", "--teacher", str(setup["teacher"]), "--prompts", str(setup["prompts"]), "--output-dir",
            str(tmp_path / "o")]
    _fails(base, "exactly one of --rank")
    _fails([*base, "--rank", "4", "--full-finetune"], "cannot be combined")
    if not torch.cuda.is_available():
        _fails([*base, "--rank", "4", "--mixed-precision", "fp16"], "needs a CUDA GPU")
    _fails([*base, "--rank", "4", "--max-steps", "0"], "max-steps must be at least 1")
    assert not (tmp_path / "o").exists()
