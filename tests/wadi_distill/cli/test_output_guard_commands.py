"""Every command of both command lines under the one output guard, with the cases that used to destroy inputs.

Each refusal is checked the same way: exit code 2, one sentence on stderr naming the problem, and the bytes of
every input file unchanged (SHA-256 of the whole fixture folder before and after). Failed writes on the way are
made real with ``ulimit -f`` in a subprocess (see tests/wadi_probe/io/test_output_guard.py for what that can and cannot show).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tiny_pipelines import make_pipeline

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher pipeline, a run folder with its adapter in final/, a student file, a probe report, prompts."""
    from diffusers import UNet2DConditionModel

    from wadi_distill.lorad.model import inject_lorad
    from wadi_distill.lorad.serialization import save_adapter
    from wadi_distill.plan import plan_from_preset
    from wadi_probe.analyze import compare

    root = tmp_path_factory.mktemp("guard")
    teacher = make_pipeline(root / "teacher", "sd")
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    student = root / "student.safetensors"
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}, str(student))
    inject_lorad(unet, plan_from_preset(unet, 2), adapter_name="student", init="random", generator=generator)
    adapter = save_adapter(unet, root / "run" / "final", plan_from_preset(unet, 2), adapter_name="student")
    report = root / "report.json"
    compare(teacher, student, device="cpu", spectra=False).save(report)
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\na tree\n")
    return {"root": root, "teacher": teacher, "student": student, "adapter": Path(adapter), "run": root / "run",
            "report": report, "prompts": prompts}


def _distill(*args):
    from wadi_distill.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _probe(*args):
    from wadi_probe.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _refused(world, result, *phrases: str) -> str:
    """Exit 2, one sentence naming the problem, no traceback; the caller checks the inputs' bytes."""
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and text.endswith("."), result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in text, text
    return text


@pytest.fixture
def unchanged(world):
    before = _hashes(world["root"])
    yield
    assert _hashes(world["root"]) == before


# ------------------------------------------------------------------------------------------------ wadi-distill
def test_export_never_replaces_the_teacher_the_run_or_the_adapter(world, unchanged, tmp_path, monkeypatch):
    teacher, adapter, run = world["teacher"], world["adapter"], world["run"]
    # item 1: -o the teacher's pipeline folder, or the run folder holding the adapter being exported
    _refused(world, _distill("export", "--teacher", teacher, "--adapter", adapter, "-o", teacher),
             f"the merged student folder {teacher} is the input {teacher}")
    _refused(world, _distill("export", "--teacher", teacher, "--adapter", adapter, "-o", run, "--overwrite"),
             f"the merged student folder {run} holds the input {adapter}")
    # item 3: -o the adapter's own weights file, in both formats
    for fmt in ("diffusers", "ldm"):
        _refused(world, _distill("export", "--teacher", teacher, "--adapter", adapter, "-o",
                                 adapter / "adapter.safetensors", "--format", fmt), "is inside the input")
    _refused(world, _distill("export", "--teacher", teacher, "--adapter", adapter, "-o", teacher / "unet" / "x.safetensors"),
             f"is inside the input {teacher}")
    # item 12: -o . is one clear sentence
    monkeypatch.chdir(tmp_path)
    _refused(world, _distill("export", "--teacher", teacher, "--adapter", adapter, "-o", "."),
             "the merged student folder . is the current folder or holds it")


def test_export_replaces_a_non_empty_folder_only_with_overwrite(world, unchanged, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ("export", "--teacher", world["teacher"], "--adapter", world["adapter"], "-o", out)
    _refused(world, _distill(*args), f"the merged student folder {out} already exists and is not empty; give --overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    done = _distill(*args, "--overwrite")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_extract_lora_never_overwrites_its_inputs_or_a_foreign_record(world, unchanged, tmp_path):
    teacher, student = world["teacher"], world["student"]
    # item 2: -o the student (or the teacher's weights)
    _refused(world, _distill("extract-lora", "--teacher", teacher, "--student", student, "-o", student, "--rank", 2),
             f"the LoRA {student} is the input {student}")
    _refused(world, _distill("extract-lora", "--teacher", teacher, "--student", student, "--rank", 2, "-o",
                             teacher / "unet" / "diffusion_pytorch_model.safetensors"), "is inside the input")
    # the record <out>.json replaces an earlier record only, never another file of that name (a probe report)
    report = tmp_path / "report.json"
    report.write_bytes(world["report"].read_bytes())
    _refused(world, _distill("extract-lora", "--teacher", teacher, "--student", student, "--rank", 2, "-o",
                             tmp_path / "report.safetensors"), f"the record {report} (written beside the LoRA) already exists")
    assert report.read_bytes() == world["report"].read_bytes()
    assert not (tmp_path / "report.safetensors").exists()
    first = _distill("extract-lora", "--teacher", teacher, "--student", student, "--rank", 2, "-o", tmp_path / "l.safetensors")
    assert first.exit_code == 0, first.output
    again = _distill("extract-lora", "--teacher", teacher, "--student", student, "--rank", 2, "-o", tmp_path / "l.safetensors")
    assert again.exit_code == 0, again.output  # its own earlier record is replaced
    assert json.loads((tmp_path / "l.json").read_text())["record_path"] == str(tmp_path / "l.json")


def test_sample_evaluate_and_plan_never_write_over_what_they_read(world, unchanged, tmp_path):
    adapter, prompts, report = world["adapter"], world["prompts"], world["report"]
    # item 4: sample's grid onto the adapter
    weights = adapter / "adapter.safetensors"
    _refused(world, _distill("sample", "--teacher", world["teacher"], "--adapter", adapter, "--prompt", "a cat",
                             "-o", weights), f"{weights} has the suffix '.safetensors'; name a .png or .jpg grid")
    # item 5: evaluate's record onto the prompt file, onto the reference statistics
    _refused(world, _distill("evaluate", "--teacher", world["teacher"], "--adapter", adapter, "--prompts", prompts,
                             "--reference", tmp_path, "-o", prompts), f"the record {prompts} is the input {prompts}")
    stats = world["root"] / "ref.npz"
    stats.write_bytes(b"hours of COCO statistics")
    try:
        _refused(world, _distill("evaluate", "--images", tmp_path, "--reference", stats, "-o", stats),
                 f"the record {stats} is the input {stats}")
    finally:
        stats.unlink()
    # item 6: plan onto the probe report it reads
    _refused(world, _distill("plan", "--teacher", world["teacher"], "--rank-from-probe", report, "-o", report),
             f"the plan {report} is the input {report}")


def test_reference_statistics_are_written_only_when_the_reference_is_large_enough(tmp_path):
    """item 19: --save-reference-stats with a reference smaller than the set to score is refused before writing."""
    import numpy as np
    from PIL import Image

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))

    torch.jit.script(Features()).save(str(tmp_path / "features.pt"))
    rng = np.random.default_rng(0)
    for folder, count in (("images", 10), ("reference", 8)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    result = _distill("evaluate", "--images", tmp_path / "images", "--reference", tmp_path / "reference", "--features",
                      tmp_path / "features.pt", "--save-reference-stats", tmp_path / "ref.npz", "-o", tmp_path / "e.json",
                      "--device", "cpu")
    assert result.exit_code == 2 and "has 8 images, fewer than the 10 to score" in " ".join(result.output.split())
    assert not (tmp_path / "ref.npz").exists() and not (tmp_path / "e.json").exists()


def test_run_never_writes_into_the_teacher(world, unchanged, tmp_path):
    teacher, prompts = world["teacher"], world["prompts"]
    base = ("run", "--teacher", teacher, "--prompts", prompts, "--rank", 2, "--max-steps", 1)
    # item 20: -o the teacher's pipeline folder, a link to it, a folder inside it, a folder holding the prompts
    _refused(world, _distill(*base, "-o", teacher), f"the output folder {teacher} is the input {teacher}")
    link = tmp_path / "teacher-link"
    link.symlink_to(teacher)
    _refused(world, _distill(*base, "-o", link), f"the output folder {link} links to the input {teacher}")
    _refused(world, _distill(*base, "-o", teacher / "runs" / "a"), "is inside the input")
    _refused(world, _distill(*base, "-o", world["root"]), "holds the input")
    assert not (teacher / "runs").exists()


def test_train_teacher_checks_its_output_before_training(tmp_path):
    """item 9: an unwritable output is refused at once (6000 steps would take many minutes on this CPU)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    started = time.perf_counter()
    result = _distill("train-teacher", "-o", blocker / "teacher", "--steps", 100000)
    assert time.perf_counter() - started < 30
    assert result.exit_code == 2 and "cannot write the teacher folder" in result.output and "is a file" in result.output
    assert blocker.read_text() == "x"


def test_demo_never_writes_into_the_shipped_model():
    from wadi_probe.builtins import builtin_path

    shipped = builtin_path("digits").parent
    before = _hashes(shipped)
    result = _distill("demo", "-o", shipped / "demo", "--quick")
    assert result.exit_code == 2 and "is inside the input builtin:digits" in " ".join(result.output.split())
    assert _hashes(shipped) == before and not (shipped / "demo").exists()


# ------------------------------------------------------------------------------------------------ wadi-probe
def test_compare_swap_and_plot_never_write_over_their_inputs(world, unchanged, tmp_path):
    teacher, student, report = world["teacher"], world["student"], world["report"]
    _refused(world, _probe("compare", teacher, student, "-o", student), f"the report {student} is the input {student}")
    link = tmp_path / "r.json"
    link.symlink_to(student)  # item 23: an -o link to an input is refused, not replaced by a plain file
    _refused(world, _probe("compare", teacher, student, "-o", link), f"the report {link} links to the input {student}")
    assert link.is_symlink()
    _refused(world, _probe("swap", teacher, student, "--take", "norm", "-o", student), f"the hybrid {student} is the input")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    _refused(world, _probe("plot", report, "--layer", layer, "--teacher", teacher, "--student", student, "-o", teacher),
             f"the plots folder {teacher} is the input {teacher}")
    _refused(world, _probe("plot", report, "-o", report), "is the input")


def test_compare_labels_cannot_write_outside_the_output_folder(world, unchanged, tmp_path):
    """item 21: --label ../x or /abs would put LABEL.json outside -o."""
    teacher, student = world["teacher"], world["student"]
    for label in ("../escaped", str(tmp_path / "abs")):
        _refused(world, _probe("compare", teacher, student, student, "--label", "a", "--label", label,
                               "-o", tmp_path / "out", "--no-spectra"), "cannot be a file name inside the output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ failed writes
def _cli(module: str, args, *, fsize: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-c", f"from {module}.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
                          preexec_fn=limit if fsize else None)


def _one_sentence(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.strip().splitlines()[-1].split())  # (loading bars of other libraries come before)
    assert text.startswith("error: Could not write ") and text.endswith(".")
    for phrase in phrases:
        assert phrase in text, text


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


LIMIT = "the file would exceed the file-size limit (ulimit -f); nothing was left half-written."


def _in_one_process(calls: list[tuple[str, list]], *, fsize: int) -> list[tuple[int, str]]:
    """Run several commands in one subprocess under ``ulimit -f fsize`` (one torch import for all): for each, the
    exit code and the last line on stderr (loading bars of other libraries come before)."""
    code = ("import json, sys\nfrom typer.testing import CliRunner\nimport wadi_probe.cli, wadi_distill.cli\n"
            "for module, args in json.loads(sys.argv[1]):\n"
            "    app = (wadi_probe.cli if module == 'wadi_probe' else wadi_distill.cli).app\n"
            "    result = CliRunner().invoke(app, args)\n"
            "    print(json.dumps([result.exit_code, result.stderr]), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    payload = json.dumps([[module, [str(a) for a in args]] for module, args in calls])
    done = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return [(code, " ".join(stderr.strip().splitlines()[-1].split()) if stderr.strip() else "") for code, stderr in results]


def test_failed_writes_of_every_writer_are_one_sentence(world, unchanged, tmp_path):
    """item 8 under ulimit -f: compare -o, swap, plot, export (folder, --format ldm --into) and extract-lora each
    exit 2 with one sentence naming the file and the reason; nothing is left, not even an empty plots folder."""
    from conftest import to_ldm_state

    teacher, adapter, student = world["teacher"], world["adapter"], world["student"]
    into = tmp_path.parent / f"{tmp_path.name}-original.safetensors"
    save_file(to_ldm_state(load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))), str(into))
    calls = [
        ("wadi_probe", ["compare", teacher, student, "-o", tmp_path / "r.json", "--no-spectra", "--no-progress"]),
        ("wadi_probe", ["swap", teacher, student, "--take", "norm", "-o", tmp_path / "h.safetensors"]),
        ("wadi_probe", ["plot", world["report"], "-o", tmp_path / "plots"]),
        ("wadi_distill", ["export", "--teacher", teacher, "--adapter", adapter, "-o", tmp_path / "m"]),
        ("wadi_distill", ["export", "--teacher", teacher, "--adapter", adapter, "--format", "ldm", "--into", into,
                          "-o", tmp_path / "full.safetensors"]),
        ("wadi_distill", ["extract-lora", "--teacher", teacher, "--student", student, "--rank", 2, "-o",
                          tmp_path / "l.safetensors"]),
    ]
    try:
        results = _in_one_process(calls, fsize=2048)
    finally:
        into.unlink()
    files = ["r.json", "h.safetensors", "plots/mean_vs_std.png", "m/diffusion_pytorch_model.safetensors",
             "full.safetensors", "l.safetensors"]
    for (code, line), name in zip(results, files, strict=True):
        assert (code, line) == (2, f"error: Could not write {tmp_path}/{name}: {LIMIT}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_that_cannot_write_its_checkpoint_stops_in_one_sentence_and_resumes(world, tmp_path):
    """item 8: a checkpoint write past ulimit -f is exit 2 and one sentence, no partial checkpoint is left, and
    --resume latest finishes once the limit is gone."""
    out = tmp_path / "run"
    args = ["run", "--teacher", world["teacher"], "--prompts", world["prompts"], "-o", out, "--rank", 2, "--fake-rank", 2,
            "--max-steps", 1, "--checkpointing-steps", 1, "--no-tensorboard", "--no-progress"]
    failed = _cli("wadi_distill", args, fsize=60000)  # the optimizer states are ~100 kB, the rest far smaller
    _one_sentence(failed, f"{out}/checkpoint-1/optimizer_", LIMIT)  # the file that hit the limit, by name
    _no_temp_files(out)
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()
    done = _cli("wadi_distill", [*args, "--resume", "latest"])
    assert done.returncode == 0, done.stderr
    assert (out / "final" / "adapter.safetensors").is_file() and (out / "checkpoint-1").is_dir()
    _no_temp_files(out)


def test_an_export_larger_than_the_free_space_is_refused_before_writing(world, tmp_path):
    """The merged student's size is known before the write: a disk without room for it is one sentence up front
    (a 64 kB tmpfs in a private mount namespace; skipped where the machine does not allow one)."""
    from _tmpfs import in_tmpfs, unshare_works

    if not unshare_works():
        pytest.skip("no private mount namespace (unshare -rm) here")
    small = tmp_path / "small"
    result = in_tmpfs(small, f"""
        import os
        from typer.testing import CliRunner
        from wadi_distill.cli import app
        out = CliRunner().invoke(app, ["export", "--teacher", {str(world['teacher'])!r}, "--adapter",
                                       {str(world['adapter'])!r}, "-o", {str(small / 'm.safetensors')!r}])
        print(out.exit_code, " ".join(out.output.split()), os.listdir({str(small)!r}))
    """)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("2 ") and line.endswith(" []"), result.stderr  # exit 2, nothing written
    assert (f"error: the merged student {small}/m.safetensors needs about 0.2 MB, but only 0.1 MB are free on the disk "
            f"holding {small}; free some space or write it elsewhere.") in line
