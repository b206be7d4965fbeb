"""VSD training on tiny SD1-, SD2-v-, SDXL- and PixArt-like teachers: steps, resume, pruning, export, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.lorad.model import use_adapter  # noqa: E402
from wadi_distill.vsd.config import EMA_MAX_DECAY, EMA_POWER, ema_decay_at  # noqa: E402
from wadi_distill.vsd.trainer import DistillConfig, VSDTrainer, distill, list_checkpoints  # noqa: E402
from wadi_probe.errors import WadiRuntimeError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


PROMPTS = "a cat\na red house\na blue car on the tree\na dog in the sky\n"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    found = {kind: make_pipeline(root / kind, kind) for kind in ("sd", "sd2", "sdxl", "pixart")}
    found["legacy"] = make_pipeline(root / "legacy", "sd", legacy_config=True)  # an SD1.5-era config.json
    return found


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def _config(teacher: Path, out: Path, prompts: Path, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), output_dir=str(out), prompts=str(prompts), rank=4, fake_rank=2,
                max_steps=2, batch_size=2, checkpointing_steps=100, progress=False, tensorboard=False,
                final_samples=2)
    base.update(kw)
    return DistillConfig(**base)


def _snapshot(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl", "pixart"])
def test_vsd_steps_change_adapters_not_the_teacher(kind, pipelines, prompt_file, tmp_path):
    trainer = VSDTrainer(_config(pipelines[kind], tmp_path / "out", prompt_file, fake_updates_per_step=2))
    frozen = {n: p.detach().clone() for n, p in trainer.base.named_parameters() if not p.requires_grad}
    student0, fake0 = _snapshot(trainer.student_named), _snapshot(trainer.fake_named)

    # the one-step formula against a hand computation, using the (still identity) student
    z = torch.randn(2, *trainer.teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.cache.get([0, 1])
    t_last = torch.full((2,), 999)
    with torch.no_grad(), use_adapter(trainer.base, "student"):
        raw = trainer.teacher.call(trainer.base, z, t_last, cond)
    a_bar = trainer.schedule.alphas_cumprod[-1].item()
    if trainer.schedule.prediction_type == "epsilon":
        expected = (z - math.sqrt(1 - a_bar) * raw) / math.sqrt(a_bar)
    else:  # v-prediction
        expected = math.sqrt(a_bar) * z - math.sqrt(1 - a_bar) * raw
    with torch.no_grad():
        got = trainer.schedule.one_step_x0(trainer.predict("student", z, t_last, cond), z)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    for _ in range(2):
        losses = trainer.train_step()
        assert math.isfinite(losses["loss_student"]) and math.isfinite(losses["loss_fake"])
    assert any(not torch.equal(student0[n], p) for n, p in trainer.student_named)
    assert any(not torch.equal(fake0[n], p) for n, p in trainer.fake_named)
    for n, p in trainer.base.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), n
    assert trainer.schedule.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")


def test_fp16_loss_scaler_keeps_the_warm_up_schedule_and_no_warning(pipelines, prompt_file, tmp_path, monkeypatch):
    # fp16 on a GPU: accelerate wraps each optimizer with a loss scaler that swaps its step method around every step.
    # Here the same on the CPU with a GradScaler; the first student gradient is made infinite, so that step is skipped
    import warnings

    import accelerate

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr("wadi_distill.vsd.trainer.Accelerator", ScaledAccelerator)
    trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / "out", prompt_file, lr_warmup_steps=10))
    student0 = _snapshot(trainer.student_named)
    overflow = trainer.student_params[0].register_hook(lambda grad: grad * float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "optimizer.step() has been overridden" was printed on every fp16 run
        trainer.train_step()
        assert trainer.opt_student.step_was_skipped and not trainer.opt_fake.step_was_skipped
        assert all(torch.equal(student0[n], p) for n, p in trainer.student_named)
        assert trainer.sched_student.last_epoch == 0  # the skipped step left the warm-up where it was
        assert trainer.sched_fake.last_epoch == 1
        overflow.remove()
        trainer.train_step()
    assert not trainer.opt_student.step_was_skipped
    assert trainer.sched_student.last_epoch == 1 and trainer.sched_fake.last_epoch == 2
    assert trainer.sched_student.get_last_lr()[0] == pytest.approx(trainer.config.lr / 10)
    assert all(torch.equal(student0[n], p) for n, p in trainer.student_named)  # the first warm-up rate is 0
    trainer.train_step()
    assert any(not torch.equal(student0[n], p) for n, p in trainer.student_named)


def test_full_finetune_trains_a_copy(pipelines, prompt_file, tmp_path):
    trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / "out", prompt_file, rank=None, student_adapter="full"))
    base0 = {n: p.detach().clone() for n, p in trainer.base.named_parameters() if not p.requires_grad}
    student0 = _snapshot(trainer.student_named)
    for _ in range(2):  # the first step's gradient is 0 (the fake score starts as the teacher), no weight decay
        trainer.train_step()
    changed = sum(not torch.equal(student0[n], p) for n, p in trainer.student_named)
    assert changed > len(student0) // 2
    assert all(torch.equal(base0[n], p) for n, p in trainer.base.named_parameters() if n in base0)


def test_gradient_checkpointing_gives_the_same_update(pipelines, prompt_file, tmp_path):
    states = []
    for flag in (False, True):
        trainer = VSDTrainer(_config(pipelines["sd2"], tmp_path / str(flag), prompt_file, gradient_checkpointing=flag))
        trainer.train_step()
        states.append({n: p.detach().clone() for n, p in trainer.student_named + trainer.fake_named})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)


def test_sequential_cfg_gives_the_same_update_from_half_batches(pipelines, prompt_file, tmp_path):
    """--sequential-cfg: the guided passes run at the batch size (not doubled) and train the same weights."""
    states, batches = [], {}
    for flag in (False, True):
        trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / str(flag), prompt_file, sequential_cfg=flag,
                                     batch_size=2, cfg=3.0))
        seen, start = batches.setdefault(flag, []), _snapshot(trainer.student_named)
        hook = trainer.base.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        for _ in range(2):  # the first step's gradient is 0: the second one tests the guided passes' values
            trainer.train_step()
        hook.remove()
        assert any(not torch.equal(start[n], p) for n, p in trainer.student_named)  # the comparison has content
        states.append({n: p.detach().clone() for n, p in trainer.student_named + trainer.fake_named})
    # per step: the student (2), the teacher and the fake score guided (4 each, or 2 + 2), the fake score's loss (2)
    assert batches[False] == [2, 4, 4, 2] * 2
    assert batches[True] == [2, 2, 2, 2, 2, 2] * 2
    # the kernels round a batch of 2 and of 4 differently in the last bits; Adam's first steps (size ≈ lr = 1e-4
    # per element, whatever the gradient's size) turn that into differences up to ≈ 4e-6 on near-zero gradients
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-5)


def test_lora_adapters_and_bf16_after_fp32_in_one_process(pipelines, prompt_file, tmp_path):
    trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / "a", prompt_file, student_adapter="lora",
                                 fake_adapter="lora", mixed_precision="bf16", ema_decay=0.5))
    assert all(".lora_" in n for n, _ in trainer.student_named + trainer.fake_named)
    assert next(p for p in trainer.base.parameters() if not p.requires_grad).dtype == torch.bfloat16
    student0 = _snapshot(trainer.student_named)
    for _ in range(2):  # the first step's gradient is 0 (the fake score starts as the teacher), no weight decay
        losses = trainer.train_step()
    assert math.isfinite(losses["loss_fake"])
    assert any(not torch.equal(student0[n], p) for n, p in trainer.student_named)
    assert any(not torch.equal(e, p) for e, (_, p) in zip(trainer.ema.shadow_params, trainer.student_named))


def _adapter_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's student tensors under the names adapter.safetensors gives them."""
    return {k.replace(".lorad_A.student", ".lorad_A").replace(".lorad_B.student", ".lorad_B"): v
            for k, v in state.items()}


def test_weight_average_by_default_final_holds_it_last_step_the_raw_weights(pipelines, prompt_file, tmp_path):
    config = _config(pipelines["sd"], tmp_path / "out", prompt_file, max_steps=3)
    assert (config.ema_decay, config.ema_power, config.adam_weight_decay) == (EMA_MAX_DECAY, EMA_POWER, 0.0)
    trainer = VSDTrainer(config)
    for k in (0, 10, 1000):  # diffusers' update number k + 1 is the trainer's step k
        expected = min(EMA_MAX_DECAY, 1 - (1 + k) ** -EMA_POWER)
        assert ema_decay_at(k, EMA_MAX_DECAY, EMA_POWER) == pytest.approx(expected, rel=1e-12)
        assert trainer.ema.get_decay(k + 1) == pytest.approx(expected, rel=1e-12)
    assert ema_decay_at(0, 0.999, 2 / 3) == 0.0 and ema_decay_at(10**6, 0.999, 2 / 3) == 0.999
    raw = []
    for _ in range(3):
        trainer.train_step()
        raw.append(_snapshot(trainer.student_named))
    average = dict(raw[0])  # decay 0 at the first update: the average starts at the weights
    for k in (1, 2):
        d = ema_decay_at(k, EMA_MAX_DECAY, EMA_POWER)
        average = {n: d * average[n] + (1 - d) * raw[k][n] for n in average}
    assert any(not torch.allclose(average[n], raw[2][n]) for n in average)
    result = trainer.train()  # the 3 steps are done: it writes final/
    assert result.last_step_dir == result.final_dir / "last-step"
    for n in average:
        torch.testing.assert_close(result.student_state[n], average[n])
        assert torch.equal(result.last_step_state[n], raw[2][n])
    averaged_file = load_file(str(result.final_dir / "adapter.safetensors"))
    raw_file = load_file(str(result.last_step_dir / "adapter.safetensors"))
    for n, value in _adapter_names(average).items():
        torch.testing.assert_close(averaged_file[n], value)
    assert raw_file.keys() == averaged_file.keys()
    assert all(torch.equal(raw_file[n], v) for n, v in _adapter_names(raw[2]).items())
    assert (result.last_step_dir / "student.safetensors").is_file()
    assert (result.last_step_dir / "adapter_config.json").read_text() == (
        result.final_dir / "adapter_config.json").read_text()
    weights = json.loads((result.final_dir / "training.json").read_text())["weights"]
    assert weights["average"]["max_decay"] == EMA_MAX_DECAY and weights["average"]["power"] == EMA_POWER
    assert weights["average"]["started_at_step"] == 0 and weights["average"]["steps_averaged"] == 3
    assert weights["last-step"] == "the raw weights of the last step"


def test_no_average_final_holds_the_raw_weights(pipelines, prompt_file, tmp_path):
    result = distill(_config(pipelines["sd"], tmp_path / "out", prompt_file, max_steps=2, ema_decay=None))
    assert result.last_step_dir is None and not (result.final_dir / "last-step").exists()
    assert all(torch.equal(result.student_state[n], v) for n, v in result.last_step_state.items())
    saved = load_file(str(result.final_dir / "adapter.safetensors"))
    assert all(torch.equal(saved[n], v) for n, v in _adapter_names(result.student_state).items())
    record = json.loads((result.final_dir / "training.json").read_text())
    assert record["ema"] is False and "average" not in record["weights"]


def test_checkpoint_without_average_resumes_with_the_average_started_there(pipelines, prompt_file, capsys,
                                                                             tmp_path):
    out = tmp_path / "out"
    distill(_config(pipelines["sd"], out, prompt_file, max_steps=2, checkpointing_steps=2, ema_decay=None))
    assert not (out / "checkpoint-2" / "ema.pt").exists()  # as a run of the code before the default average
    capsys.readouterr()
    result = distill(_config(pipelines["sd"], out, prompt_file, max_steps=4, checkpointing_steps=1,
                             resume="latest"))
    said = capsys.readouterr().out
    assert said.count("holds no weight average: the average starts from its weights at step 2") == 1
    history = json.loads((out / "run.json").read_text())["history"]
    assert "holds no weight average" in history[-1]["note"] and "note" not in history[0]
    assert history[-1]["changed"]["ema_decay"] == [None, EMA_MAX_DECAY]
    # the ramp counts from the resumed step: decay 0 at step 3's update, then decay(1) at step 4's
    p3, p4 = (load_file(str(out / f"checkpoint-{s}" / "student.safetensors")) for s in (3, 4))
    d = ema_decay_at(1, EMA_MAX_DECAY, EMA_POWER)
    for n in p4:
        torch.testing.assert_close(result.student_state[n], d * p3[n] + (1 - d) * p4[n])
    assert torch.load(out / "checkpoint-3" / "ema.pt", weights_only=True)["update_after_step"] == 2
    average = json.loads((out / "final" / "training.json").read_text())["weights"]["average"]
    assert average["started_at_step"] == 2 and average["steps_averaged"] == 2
    # an average of the earlier fixed-decay rule continues on the ramp, with a note
    old = torch.load(out / "checkpoint-4" / "ema.pt", weights_only=True)
    old.update(decay=0.9, min_decay=0.9, update_after_step=-1, use_ema_warmup=False)
    torch.save(old, out / "checkpoint-4" / "ema.pt")
    capsys.readouterr()
    distill(_config(pipelines["sd"], out, prompt_file, max_steps=5, checkpointing_steps=1, resume="latest"))
    assert "used a fixed decay 0.9; it continues with decay min(0.999, 1 - (1 + step)^-0.667)" in capsys.readouterr().out
    ema = torch.load(out / "checkpoint-5" / "ema.pt", weights_only=True)
    assert ema["use_ema_warmup"] and (ema["decay"], ema["min_decay"], ema["optimization_step"]) == (EMA_MAX_DECAY, 0.0, 5)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from wadi_distill.vsd.trainer import DistillConfig, distill
    cfg = DistillConfig(**__import__("json").loads(sys.argv[1]))
    distill(cfg)
""")


def _read_log_steps(out: Path) -> list[int]:
    path = out / "logs" / "losses.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical_and_limit_prunes(pipelines, prompt_file, tmp_path):
    """The killed run is another process (another PYTHONHASHSEED) naming the teacher by a relative path; the
    teacher's config lacks newer keys, as the original SD1.5 one does."""
    steps = 6
    teacher = pipelines["legacy"]
    kw = dict(checkpointing_steps=2, batch_size=1, max_steps=steps)  # the weight average on, as by default
    # uninterrupted reference, with pruning down to the 2 newest checkpoints
    ref = distill(_config(teacher, tmp_path / "ref", prompt_file, checkpoints_total_limit=2, **kw))
    assert [s for s, _ in list_checkpoints(tmp_path / "ref")] == [4, 6]

    # a run that is SIGKILLed after its first checkpoint, between checkpoints
    killed = tmp_path / "killed"
    cfg = _config(Path(os.path.relpath(teacher, tmp_path)), killed, prompt_file, **{**kw, "max_steps": 10_000})
    payload = json.dumps({k: v for k, v in cfg.__dict__.items()})
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, payload], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            logged = _read_log_steps(killed)
            done = [s for s, _ in list_checkpoints(killed)]
            if done and logged and logged[-1] > done[-1] and logged[-1] % 2 == 1:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last_ckpt = list_checkpoints(killed)[-1][0]
    assert last_ckpt < steps and max(_read_log_steps(killed)) > last_ckpt  # it really died between checkpoints

    stale = killed / ".checkpoint-99.abc123.tmp"  # what a kill during a checkpoint write leaves behind
    stale.mkdir()
    resumed = distill(_config(teacher.resolve(), killed, prompt_file, resume="latest", **kw))
    assert resumed.steps == steps and not stale.exists()
    assert (ref.final_dir / "last-step").is_dir() and not (ref.final_dir / "ema").exists()
    for name in ("adapter.safetensors", "student.safetensors", "last-step/adapter.safetensors",
                 "last-step/student.safetensors"):
        a, b = load_file(str(ref.final_dir / name)), load_file(str(resumed.final_dir / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(ref.fake_state[k], resumed.fake_state[k]) for k in ref.fake_state)
    assert _read_log_steps(killed) == list(range(1, steps + 1))  # lines past the checkpoint were dropped


def test_export_loads_into_stock_diffusers_class(pipelines, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    result = distill(_config(pipelines["sd2"], tmp_path / "out", prompt_file, max_steps=2))
    assert (result.final_dir / "adapter_config.json").is_file()
    assert (result.final_dir / "samples" / "grid.png").is_file()
    stock = UNet2DConditionModel.from_pretrained(pipelines["sd2"] / "unet")
    stock.load_state_dict(load_file(str(result.merged_path)), strict=True)

    from wadi_distill.lorad.serialization import load_adapter
    from wadi_distill.teachers.pipeline import load_teacher

    teacher = load_teacher(pipelines["sd2"], load_text_encoders=False, load_vae=False)
    load_adapter(teacher.denoiser, result.final_dir, adapter_name="student")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 400])
    hidden = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = teacher.denoiser(x, t, encoder_hidden_states=hidden).sample
        plain = stock(x, t, encoder_hidden_states=hidden).sample
        teacher_out = UNet2DConditionModel.from_pretrained(pipelines["sd2"] / "unet")(
            x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, teacher_out)  # the student really moved away from the teacher


def test_nan_loss_stops_with_step_and_keeps_checkpoint(pipelines, prompt_file, tmp_path):
    trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / "out", prompt_file))
    trainer.train_step()
    ckpt = trainer.save_checkpoint()
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with torch.no_grad():
        trainer.student_named[0][1].fill_(float("nan"))
    with pytest.raises(WadiRuntimeError, match=r"at step 2.*checkpoint-1"):
        trainer.train_step()
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_digits_teacher_folder_full_and_lorad(tmp_path):
    models = pytest.importorskip("wadi_distill.builtin.digits.model")
    if not hasattr(models, "build_teacher") or not hasattr(models, "save_teacher"):
        pytest.skip("the digits teacher builder is not available")
    torch.manual_seed(0)
    folder = tmp_path / "digits"
    models.save_teacher(models.build_teacher(), folder)
    full = distill(DistillConfig(teacher=str(folder), output_dir=str(tmp_path / "full"), student_adapter="full",
                                 max_steps=1, progress=False, tensorboard=False, batch_size=2, final_samples=2))
    assert full.adapter_path is None and full.merged_path.is_file() and full.samples_path.is_file()
    lorad = distill(DistillConfig(teacher=str(folder), output_dir=str(tmp_path / "lorad"), rank=4, fake_rank=2,
                                  max_steps=1, progress=False, tensorboard=False, batch_size=2, final_samples=2))
    assert lorad.adapter_path.is_file()
    prompts = json.loads((lorad.final_dir / "samples" / "prompts.json").read_text())
    assert prompts == [models.build_teacher().prompts_for_class(k) for k in range(2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_steps_train_without_warnings(precision, pipelines, prompt_file, tmp_path):
    """A few VSD steps on the GPU in fp16 (accelerate's loss scaler) and bf16: finite losses, trained adapters, an
    untouched teacher, and none of torch's scheduler warnings (seen on every fp16 run before the schedulers were
    made ahead of accelerate's wrapping)."""
    import warnings

    trainer = VSDTrainer(_config(pipelines["sd"], tmp_path / precision, prompt_file, device="cuda",
                                 mixed_precision=precision, lr_warmup_steps=0))
    frozen = {n: p.detach().clone() for n, p in trainer.base.named_parameters() if not p.requires_grad}
    student0 = _snapshot(trainer.student_named)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="torch.optim.lr_scheduler")
        for _ in range(6):  # fp16's first steps may be skipped while the loss scale settles
            losses = trainer.train_step()
            assert math.isfinite(losses["loss_student"]) and math.isfinite(losses["loss_fake"])
    assert any(not torch.equal(student0[n], p) for n, p in trainer.student_named)
    assert all(torch.equal(frozen[n], p) for n, p in trainer.base.named_parameters() if n in frozen)
    frozen_dtype = next(p for p in trainer.base.parameters() if not p.requires_grad).dtype
    assert frozen_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
