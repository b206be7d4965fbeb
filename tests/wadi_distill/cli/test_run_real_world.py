"""`wadi-distill run` / `sample` as users meet them: teachers whose configs lack newer keys, fp16-only folders,
relative and absolute paths, new processes under other hash seeds, resume with changed options, EMA outputs,
batch-job logs, bad inputs, and the umask."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402
from wadi_probe.io.atomic import atomic_path, write_json_atomic  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
CLI = "import torch; torch.set_num_threads(1); from wadi_distill.cli import main; main()"


@pytest.fixture(scope="module")
def world(teacher_family) -> dict[str, Path]:
    return {**teacher_family, "legacy": teacher_family["legacy-sd15"], "fp16": teacher_family["sdxl-fp16-hub"]}


def _args(teacher, out, prompts, *extra) -> list[str]:
    return ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--output-dir", str(out), "--rank", "4",
            "--fake-rank", "2", "--batch-size", "1", "--no-tensorboard", *map(str, extra)]


def _fails(args: list[str], *messages: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for message in messages:
        assert message in text, text
    return text


def _cli(args: list[str], cwd: Path, hash_seed: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


IDENTITY = """
import json, sys
from wadi_distill.teachers.pipeline import load_teacher
from wadi_distill.teachers.embedding_cache import cache_key
t = load_teacher(sys.argv[1], load_text_encoders=False, load_vae=False)
print(json.dumps({"order": t.denoiser.config["_use_default_values"], "fingerprint": t.fingerprint,
                  "weights": t.weights_digest(), "cache": cache_key(["a cat"], t.fingerprint)}))
"""


def test_identity_is_the_same_in_every_process_and_from_every_path(world):
    legacy = world["legacy"]
    seen = []
    for seed, name in ((0, str(legacy)), (1, legacy.name), (2, f"./{legacy.name}/")):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run([sys.executable, "-c", IDENTITY, name], cwd=legacy.parent, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len({tuple(s["order"]) for s in seen}) > 1  # the fixture really lacks keys: diffusers' list order varies
    assert len({(s["fingerprint"], s["weights"], s["cache"]) for s in seen}) == 1


@pytest.mark.slow
def test_digits_resume_in_new_processes_after_final_is_deleted(tmp_path):
    """The reported case: builtin:digits, checkpoints every 3 of 6 steps, final/ and checkpoint-6 deleted."""
    args = ["run", "--teacher", "builtin:digits", "--preset", "paper", "--rank", "4", "--max-steps", "6",
            "--checkpointing-steps", "3", "--batch-size", "8", "--output-dir", "B", "--no-tensorboard"]
    first = _cli(args, tmp_path, hash_seed=1)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = load_file(str(tmp_path / "B" / "checkpoint-6" / "student.safetensors"))
    weights = ("adapter.safetensors", "adapter_config.json", "student.safetensors", "last-step/adapter.safetensors",
               "last-step/adapter_config.json", "last-step/student.safetensors", "samples/grid.png")
    digests = {name: hashlib.sha256((tmp_path / "B" / "final" / name).read_bytes()).hexdigest() for name in weights}
    assert (tmp_path / "B" / "checkpoint-3" / "ema.pt").is_file()  # the weight average is checkpointed
    shutil.rmtree(tmp_path / "B" / "final")
    shutil.rmtree(tmp_path / "B" / "checkpoint-6")
    again = _cli([*args[:-3], "--output-dir", str(tmp_path / "B"), "--no-tensorboard", "--resume", "latest"],
                 tmp_path.parent, hash_seed=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 3" in again.stdout and "trained 6 steps" in again.stdout
    resumed = load_file(str(tmp_path / "B" / "checkpoint-6" / "student.safetensors"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    # final/ (the weight average) and final/last-step/ are the uninterrupted run's, byte for byte
    assert {name: hashlib.sha256((tmp_path / "B" / "final" / name).read_bytes()).hexdigest()
            for name in weights} == digests


def test_resume_refuses_changed_training_options_and_records_others(world, tmp_path):
    out = tmp_path / "out"
    first = runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "2",
                                     "--checkpointing-steps", "1", "--ema-decay", "0.9"))
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()}
    resume = _args(world["legacy"], out, world["prompts"], "--checkpointing-steps", "1", "--resume", "latest")
    _fails([*resume, "--max-steps", "3", "--lr", "0.001"], "trained with --lr 0.0001", "asks for --lr 0.001")
    _fails([*resume, "--max-steps", "3", "--cfg", "2"], "--cfg 1.5", "--cfg 2.0")
    _fails([*resume, "--max-steps", "3", "--sequential-cfg"], "trained with --sequential-cfg False",
           "asks for --sequential-cfg True")
    # a run started with the old default weight decay says how to resume it
    _fails([*resume, "--max-steps", "3", "--adam-weight-decay", "0.01"], "trained with --adam-weight-decay 0.0",
           "asks for --adam-weight-decay 0.01")
    # another plan or other weights: the sentence says which part of the run differs
    _fails([*_args(world["legacy"], tmp_path / "o", world["prompts"], "--resume", out / "checkpoint-1"),
            "--rank", "2"], "another run", "plan")
    other = make_pipeline(tmp_path / "other", "sd", seed=1, legacy_config=True)
    _fails(_args(other, tmp_path / "o", world["prompts"], "--resume", out / "checkpoint-1"),
           "another run", "the teacher's weights differ")
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()} == before
    assert not (tmp_path / "o").exists()
    # options that do not change a step's math are applied and recorded: the length, the weight average's rule
    longer = runner.invoke(app, [*resume, "--max-steps", "3", "--ema-decay", "0.5", "--ema-power", "0.75"])
    assert longer.exit_code == 0, longer.output
    assert "resumed at step 2" in longer.output and "max_steps 2 -> 3" in longer.output
    said = " ".join(longer.output.split())
    assert "ema_decay 0.9 -> 0.5" in said and f"ema_power {2 / 3} -> 0.75" in said
    history = json.loads((out / "run.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2]
    assert history[1]["changed"] == {"max_steps": [2, 3], "ema_decay": [0.9, 0.5], "ema_power": [2 / 3, 0.75]}
    ema = torch.load(out / "checkpoint-3" / "ema.pt", weights_only=True)
    assert (ema["decay"], ema["power"], ema["optimization_step"]) == (0.5, 0.75, 3)


class _TinyFeatures(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 4): a fixed random conv, pooled (a stand-in feature network for evaluate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 255.0)).mean(dim=(2, 3))


def _adapter_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".lorad_A.student", ".lorad_A").replace(".lorad_B.student", ".lorad_B"): v
            for k, v in state.items()}


def _same_file(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _tools_take(adapter: Path, merged: Path, world: dict, tmp_path: Path, name: str) -> None:
    """export, sample, evaluate and wadi-probe compare all take the adapter folder ``adapter``."""
    teacher = world["legacy"]
    exported = tmp_path / f"{name}.safetensors"
    done = runner.invoke(app, ["export", "--teacher", str(teacher), "--adapter", str(adapter), "-o", str(exported)])
    assert done.exit_code == 0, done.output
    assert _same_file(exported, merged)
    grid = tmp_path / f"{name}.png"
    done = runner.invoke(app, ["sample", "--teacher", str(teacher), "--adapter", str(adapter), "--prompt", "a cat",
                               "-n", "1", "-o", str(grid)])
    assert done.exit_code == 0 and grid.is_file(), done.output
    reference = tmp_path / "reference"
    if not reference.is_dir():
        from PIL import Image

        reference.mkdir()
        g = torch.Generator().manual_seed(0)
        for i in range(6):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(reference / f"{i}.png")
        torch.jit.script(_TinyFeatures().eval()).save(str(tmp_path / "features.pt"))
        (tmp_path / "six.txt").write_text("a cat\na dog\na red house\na blue car\na tree\na cat in the sky\n")
    record = tmp_path / f"{name}.json"
    done = runner.invoke(app, ["evaluate", "--teacher", str(teacher), "--adapter", str(adapter), "--prompts",
                               str(tmp_path / "six.txt"), "--reference", str(reference), "--features",
                               str(tmp_path / "features.pt"), "--kid-subsets", "2", "-o", str(record)])
    assert done.exit_code == 0 and record.is_file(), done.output
    from wadi_probe.cli import app as probe

    report = tmp_path / f"{name}-report.json"
    done = runner.invoke(probe, ["compare", str(teacher / "unet"), str(adapter / "adapter.safetensors"), "--adapter",
                                 "--no-spectra", "--no-progress", "-o", str(report)])
    assert done.exit_code == 0 and report.is_file(), done.output


def test_final_holds_the_weight_average_last_step_the_raw_weights_and_every_tool_takes_them(world, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "3",
                                      "--checkpointing-steps", "1"))
    assert result.exit_code == 0, result.output
    final, last = out / "final", out / "final" / "last-step"
    said = " ".join(result.output.split())
    assert f"adapter (weight average): {final / 'adapter.safetensors'}" in said
    assert f"last step's raw weights: {last}" in said
    assert sorted(p.name for p in last.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                      "student.safetensors"]
    assert not (final / "ema").exists()
    assert (last / "adapter_config.json").read_text() == (final / "adapter_config.json").read_text()
    # final/ is the EMA of the raw weights of steps 1-3 (decay 0, then the ramp's values at 1 and 2)
    from wadi_distill.vsd.config import EMA_MAX_DECAY, EMA_POWER, ema_decay_at

    raw = [load_file(str(out / f"checkpoint-{s}" / "student.safetensors")) for s in (1, 2, 3)]
    average = dict(raw[0])
    for k in (1, 2):
        d = ema_decay_at(k, EMA_MAX_DECAY, EMA_POWER)
        average = {n: d * average[n] + (1 - d) * raw[k][n] for n in average}
    got, trained = load_file(str(final / "adapter.safetensors")), load_file(str(last / "adapter.safetensors"))
    for n, value in _adapter_names(average).items():
        torch.testing.assert_close(got[n], value)
    assert all(torch.equal(trained[n], v) for n, v in _adapter_names(raw[2]).items())
    assert any(not torch.equal(got[k], trained[k]) for k in got)
    record = json.loads((final / "training.json").read_text())["weights"]
    assert record["average"]["steps_averaged"] == 3 and record["average"]["max_decay"] == EMA_MAX_DECAY
    # the tools take final/ (the average) by default; the run folder itself means its final/
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from wadi_distill.lorad import load_lorad

    pipe = StableDiffusionPipeline.from_pretrained(world["legacy"], local_files_only=True)
    assert load_lorad(pipe, out).path == final
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=g)
    outputs = {}
    for name, merged in (("loaded", None), ("average", final), ("last", last)):
        unet = pipe.unet
        if merged is not None:
            unet = UNet2DConditionModel.from_pretrained(world["legacy"] / "unet")
            unet.load_state_dict(load_file(str(merged / "student.safetensors")), strict=True)
        with torch.no_grad():
            outputs[name] = unet(x, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(outputs["loaded"], outputs["average"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs["loaded"], outputs["last"], rtol=1e-4, atol=1e-5)
    _tools_take(final, final / "student.safetensors", world, tmp_path, "final")
    _tools_take(last, last / "student.safetensors", world, tmp_path, "last")
    # a run folder of the earlier layout (final/ the raw weights, final/ema/ the average) stays readable
    old = tmp_path / "old-run" / "final"
    shutil.copytree(final, old)
    (old / "last-step").rename(old / "ema")
    _tools_take(old / "ema", old / "ema" / "student.safetensors", world, tmp_path, "old-ema")


def test_no_ema_writes_the_raw_weights_to_final(world, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "2",
                                      "--checkpointing-steps", "1", "--no-ema"))
    assert result.exit_code == 0, result.output
    assert "adapter (last step's weights)" in " ".join(result.output.split())
    assert not (out / "final" / "last-step").exists() and not (out / "checkpoint-2" / "ema.pt").exists()
    raw = load_file(str(out / "checkpoint-2" / "student.safetensors"))
    saved = load_file(str(out / "final" / "adapter.safetensors"))
    assert all(torch.equal(saved[n], v) for n, v in _adapter_names(raw).items())
    assert json.loads((out / "final" / "training.json").read_text())["ema"] is False


@pytest.mark.parametrize("name", ["sdxl-fp16-hub", "sd2-fp16"])
def test_fp16_only_variant_folder_runs_and_samples(name, world, tmp_path):
    """fp16-only teachers: SDXL-like as the Hub ships it (a cache snapshot of symbolic links), SD2-like plain."""
    teacher = world[name]
    assert all(p.is_symlink() == name.endswith("hub") for p in teacher.rglob("*.safetensors"))
    out = tmp_path / "out"
    result = runner.invoke(app, _args(teacher, out, world["prompts"], "--max-steps", "1",
                                      "--checkpointing-steps", "1"))
    assert result.exit_code == 0, result.output
    merged = load_file(str(out / "final" / "student.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.float16}  # the teacher's own dtype, as export writes it
    grid = tmp_path / "s.png"
    done = runner.invoke(app, ["sample", "--teacher", str(teacher), "--merged",
                               str(out / "final" / "student.safetensors"), "--prompt", "a cat", "-n", "2",
                               "-o", str(grid)])
    assert done.exit_code == 0 and grid.is_file(), done.output


def test_plain_log_lines_when_stdout_is_not_a_terminal(world, tmp_path):
    result = runner.invoke(app, _args(world["legacy"], tmp_path / "out", world["prompts"], "--max-steps", "4",
                                      "--checkpointing-steps", "2", "--log-every", "2", "--validation-steps", "4"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    pattern = r"^step (\d)/4  loss_student \S+  loss_fake \S+  [0-9.e+-]+ s/step  ETA \d+:\d\d:\d\d$"
    assert [re.match(pattern, line).group(1) for line in steps] == ["2", "4"], steps
    assert "encoding 3 prompts into" in result.output  # (stderr's loading bars may share its line here)
    assert re.search(r"encoded 3/3 prompts \([0-9.]+ prompts/s\)", result.output)
    assert sum(line.startswith("checkpoint ") for line in lines) == 2
    assert any(line.startswith("validation images ") for line in lines)
    assert "━" not in result.output  # no bar drawn into a pipe


def test_bad_inputs_one_sentence_nothing_written(world, tmp_path):
    teacher, prompts = world["legacy"], world["prompts"]
    out = tmp_path / "o"
    _fails(_args(teacher, out, prompts, "--lr", "-1"), "lr must be a positive number")
    _fails(_args(teacher, out, prompts, "--fake-lr", "nan"), "fake-lr must be a positive number")
    _fails(_args(teacher, out, prompts, "--ema-decay", "1"), "ema-decay must lie strictly between 0 and 1, not 1.")
    _fails(_args(teacher, out, prompts, "--ema-decay", "0"), "ema-decay must lie strictly between 0 and 1, not 0.")
    _fails(_args(teacher, out, prompts, "--ema-power", "0"), "ema-power must be a positive number, not 0.")
    _fails(_args(teacher, out, prompts, "--ema-power", "nan"), "ema-power must be a positive number, not nan.")
    _fails(_args(teacher, out, prompts, "--no-ema", "--ema-decay", "0.99"), "--no-ema and --ema-decay / --ema-power "
           "cannot be combined.")
    _fails(_args(teacher, out, prompts, "--adam-weight-decay", "-1"), "adam-weight-decay must not be negative.")
    _fails(_args(teacher, out, prompts, "--device", "gpu"), "unknown device 'gpu'; use auto, cpu or cuda.")
    _fails(_args(teacher, out, prompts, "--mixed-precision", "fp8"), "unknown mixed precision 'fp8'; use no, fp16 or bf16.")
    _fails(_args(teacher, out, prompts, "--prompts", tmp_path / "missing.txt"), "does not exist")
    _fails(_args(teacher, out, prompts, "--prompts", tmp_path), "is a folder, not a file")
    _fails(["run", "--teacher", str(teacher), "--output-dir", str(out), "--rank", "4"], "(--prompts) is needed")
    assert not out.exists()
    # prompts the encoder refuses (the digits encoder knows a fixed vocabulary): refused, nothing left behind
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("a handwritten digit 7\na purple elephant\n")
    _fails(["run", "--teacher", "builtin:digits", "--prompts", str(unknown), "--output-dir", str(out), "--rank", "4"],
           "does not know the word(s) 'purple', 'elephant'")
    _fails(["run", "--teacher", "builtin:digits", "--output-dir", str(out), "--rank", "4", "--validation-prompt",
            "a cat"], "does not know the word(s) 'cat'")
    assert not out.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails(_args(teacher, a_file, prompts), "is a file")
    _fails(_args(teacher, a_file / "sub", prompts), "is a file")
    _fails(_args(teacher, Path("/proc/wadi-out"), prompts), "cannot write the output folder /proc/wadi-out")
    assert a_file.read_text() == "x"


def test_broken_checkpoints_are_refused_before_anything_is_written(world, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "1",
                                      "--checkpointing-steps", "1"))
    assert result.exit_code == 0, result.output
    for name, change, message in (("student.safetensors", "truncate", "unreadable"),
                                  ("optimizer_student.pt", "delete", "incomplete: optimizer_student.pt missing"),
                                  ("rng.safetensors", "delete", "incomplete: rng.safetensors missing"),
                                  ("optimizer_fake.pt", "truncate", "unreadable")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(out / "checkpoint-1", broken)
        path = broken / name
        if change == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        before = {p.name: p.read_bytes() for p in broken.iterdir()}
        fresh = tmp_path / f"resume-{name}"
        _fails(_args(world["legacy"], fresh, world["prompts"], "--resume", broken), message)
        assert not fresh.exists()  # not even the embedding cache
        assert {p.name: p.read_bytes() for p in broken.iterdir()} == before


def test_sample_bad_inputs(world, tmp_path):
    common = ["sample", "--teacher", str(world["legacy"]), "--prompt", "a cat", "--merged", str(tmp_path / "x")]
    _fails([*common, "-n", "0", "-o", str(tmp_path / "a.png")], "at least 1")
    if not torch.cuda.is_available():
        _fails([*common, "--device", "cuda", "-o", str(tmp_path / "a.png")], "CUDA is not available")
    _fails([*common, "-o", "/proc/wadi.png"], "cannot write the image grid /proc/wadi.png")
    _fails([*common, "-o", str(tmp_path / "a.gif")], "has the suffix '.gif'")  # a folder is one PNG per image
    _fails([*common, "-o", str(tmp_path / "a.png")], "does not exist")
    assert not (tmp_path / "a.png").exists()


def _modes(folder: Path) -> tuple[set[int], set[int]]:
    files, dirs = set(), set()
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        (dirs if path.is_dir() else files).add(mode)
    return files, dirs


def test_outputs_follow_the_umask(world, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        result = runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "1",
                                          "--checkpointing-steps", "1", "--ema-decay", "0.9"))
        assert result.exit_code == 0, result.output
        files, dirs = _modes(out)
        assert files == {0o644} and dirs == {0o755}
        os.umask(0o027)  # the probe's writers share atomic_path
        report = write_json_atomic(tmp_path / "probe" / "report.json", {"layers": []})
        with atomic_path(tmp_path / "probe" / "plots", directory=True) as tmp:
            (tmp / "a.png").write_bytes(b"")
        assert stat.S_IMODE(report.stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "probe" / "plots").stat().st_mode) == 0o750
    finally:
        os.umask(previous)


def test_mixed_precision_comes_from_accelerate_when_not_given(world, tmp_path, monkeypatch):
    from wadi_distill.vsd.trainer import DistillConfig, VSDTrainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = DistillConfig(teacher=str(world["legacy"]), output_dir=str(tmp_path / "o"),
                           prompts=str(world["prompts"]), rank=4, fake_rank=2, max_steps=1, progress=False,
                           tensorboard=False, device="cpu")
    trainer = VSDTrainer(config)
    assert trainer.mixed_precision == "bf16"
    assert next(p for p in trainer.base.parameters() if not p.requires_grad).dtype == torch.bfloat16
    trainer.close()  # one trainer per output folder at a time
    config.mixed_precision = "no"  # the option wins over accelerate's
    assert VSDTrainer(config).mixed_precision == "no"


def test_gradient_scaler_state_is_checkpointed(world, tmp_path):
    from wadi_distill.vsd.trainer import DistillConfig, VSDTrainer

    config = DistillConfig(teacher=str(world["legacy"]), output_dir=str(tmp_path / "o"),
                           prompts=str(world["prompts"]), rank=4, fake_rank=2, max_steps=1, progress=False,
                           tensorboard=False, device="cpu")
    trainer = VSDTrainer(config)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 9, growth_interval=3)
    trainer.accelerator.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    trainer.accelerator.scaler.update(new_scale=torch.tensor(123.0))
    trainer.step = 1
    path = trainer.save_checkpoint()
    assert (path / "scaler.pt").is_file()
    config.resume = str(path)
    config.output_dir = str(tmp_path / "o2")
    resumed = VSDTrainer(config)
    # a CPU run has no scaler of its own: attach one and load the checkpoint into it, as an fp16 GPU run does
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu")
    resumed.load_checkpoint(path)
    assert resumed.accelerator.scaler.get_scale() == 123.0
    assert resumed.accelerator.scaler.get_growth_interval() == 3


def test_identity_names_each_differing_part():
    from wadi_distill.vsd.identity import identity_for

    base = dict(teacher_fingerprint="t", weights_digest="w", student="lorad", plan_ranks={"a": 4}, fake_kind="lorad",
                fake_ranks={"a": 2}, prompts_key="p", batch_size=2, processes=1)
    one = identity_for(**base)
    assert identity_for(**base).run_id == one.run_id
    two = identity_for(**{**base, "processes": 2, "prompts_key": "q"})
    assert two.run_id != one.run_id
    assert two.differences(one.parts) == ["the prompts", "the batch (2 per process x 1 processes then, 2 x 2 now)"]
    message = two.refusal("out/checkpoint-4", one.parts)
    assert message.startswith("The checkpoint out/checkpoint-4 was written by another run (the prompts, the batch")
    assert "(it records no details)" in two.refusal("old", None)


def test_resume_path_that_is_a_file(world, tmp_path):
    a_file = tmp_path / "checkpoint-3"
    a_file.write_text("x")
    _fails(_args(world["legacy"], tmp_path / "o", world["prompts"], "--resume", a_file), "is a file; --resume takes")
    assert not (tmp_path / "o").exists()


def test_every_writer_refuses_an_unwritable_destination_with_a_sentence(world, tmp_path):
    """plan -o, export -o and the probe's outputs all write through atomic_path, which refuses in one sentence."""
    from wadi_probe.errors import WadiInputError

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails(["plan", "--teacher", str(world["legacy"]), "--preset", "paper", "--rank", "4", "-o",
            str(a_file / "plan.json")], f"cannot write the plan {a_file / 'plan.json'} ({a_file} is a file, not a folder)")
    out = tmp_path / "run"
    assert runner.invoke(app, _args(world["legacy"], out, world["prompts"], "--max-steps", "1")).exit_code == 0
    _fails(["export", "--teacher", str(world["legacy"]), "--adapter", str(out / "final"), "-o",
            "/proc/wadi-merged.safetensors"], "cannot write the merged student /proc/wadi-merged.safetensors (/proc: ")
    with pytest.raises(WadiInputError, match="is a file, not a folder"):
        write_json_atomic(a_file / "deeper" / "report.json", {})
    assert a_file.read_text() == "x"


def test_progress_bar_on_request_and_the_plain_line_format(world, tmp_path):
    from wadi_distill.vsd.run_log import format_duration, progress_line

    assert format_duration(3725.4) == "1:02:05" and format_duration(-3) == "0:00:00"
    line = progress_line(20, 1000, {"loss_student": 1.23456e-05, "loss_fake": 0.00264801}, 0.84)
    assert line == "step 20/1000  loss_student 1.235e-05  loss_fake 0.002648  0.84 s/step  ETA 0:13:43"
    result = runner.invoke(app, _args(world["legacy"], tmp_path / "out", world["prompts"], "--max-steps", "2",
                                      "--progress"))
    assert result.exit_code == 0, result.output
    assert "VSD" in result.output and "s/step" in result.output
    assert not any(line.startswith("step ") for line in result.output.splitlines())
