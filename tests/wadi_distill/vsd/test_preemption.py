"""Stop signals: a run finishes its step, writes a checkpoint, exits 75 (SIGTERM/SIGUSR1) or 130 (Ctrl-C), and
``--resume latest`` in a new process ends with the same bytes as an uninterrupted run; a closed stdout is harmless."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.cli import app  # noqa: E402
from wadi_distill.vsd.preemption import (EXIT_INTERRUPTED, EXIT_REQUEUE, RunStopped, StopSignals,  # noqa: E402
                                         parse_signals)
from wadi_distill.vsd.run_lock import LOCK_NAME  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


# ------------------------------------------------------------------------------------------ the signal flag
def test_parse_signals_accepts_names_and_refuses_what_cannot_be_caught():
    assert parse_signals(["SIGTERM", "usr1", "USR2", "SIGUSR1"]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    for name, why in (("SIGKILL", "cannot be caught"), ("STOP", "cannot be caught"), ("INT", "always handled"),
                      ("SIGNOPE", "not a signal"), ("9", "not a signal")):
        with pytest.raises(WadiInputError, match=why):
            parse_signals([name])


def test_armed_handler_only_sets_the_flag_and_restore_puts_the_old_handler_back():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1"])
    with stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.requested() and stop.received == signal.SIGUSR1
        assert stop.requested(lambda local: False) is False  # the processes' agreement decides
        stopped = stop.stopped(7, Path("out/checkpoint-7"))
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert stopped.exit_code == EXIT_REQUEUE == 75
    assert stopped.message() == ("SIGUSR1 received: stopped after step 7 with checkpoint out/checkpoint-7; continue "
                                 "with --resume latest (exit code 75).")


def test_ctrl_c_stops_with_130_and_a_second_ctrl_c_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals(["SIGTERM"]) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.stopped(3, None).exit_code == EXIT_INTERRUPTED == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) == previous


def test_during_set_up_a_signal_raises_at_once():
    stop = StopSignals(["SIGTERM"]).install()
    try:
        with pytest.raises(RunStopped) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    finally:
        stop.restore()
    assert raised.value.step is None and raised.value.exit_code == 75
    assert "before training started" in str(raised.value)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_cli_refuses_a_signal_it_cannot_catch(tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", "--teacher", "builtin:digits", "-o", str(out), "--rank", "2",
                                 "--checkpoint-signal", "SIGKILL"])
    assert result.exit_code == 2 and "--checkpoint-signal SIGKILL cannot be caught" in result.output
    assert not out.exists()


# ------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preempt")
    teacher = make_pipeline(root / "sd", "sd")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na red house\na dog in the sky\n")
    return {"root": root, "teacher": teacher, "prompts": prompts}


def _args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["run", "--teacher", str(world["teacher"]), "--prompts", str(world["prompts"]), "-o", str(out), "--rank",
            "4", "--fake-rank", "2", "--max-steps", "8", "--checkpointing-steps", "100", "--no-tensorboard",
            "--no-progress", "--log-every", "1", "--device", "cpu", *extra]


def _start(world: dict[str, Path], out: Path, hash_seed: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    code = "from wadi_distill.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *_args(world, out, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=world["root"])


def _signal_after(proc: subprocess.Popen, step: int, sig: signal.Signals) -> list[str]:
    """Send ``sig`` once the run printed ``step N/`` with N >= ``step``; the lines it printed, to its end."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        match = re.match(r"step (\d+)/", line)
        if match and int(match.group(1)) >= step:
            proc.send_signal(sig)
            break
    lines += proc.stdout.read().splitlines()
    proc.wait(timeout=300)
    return lines


def _tensor_sha(path: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in load_file(str(path)).items()}


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_sigterm_then_ctrl_c_then_resume_gives_the_uninterrupted_bytes(world, tmp_path):
    """Interrupted by SIGTERM, resumed and interrupted by Ctrl-C, resumed to the end: three processes with other
    hash seeds; the adapter and merged student equal an uninterrupted run's, tensor by tensor and byte by byte."""
    out = tmp_path / "stopped"
    first = _start(world, out, "11")
    lines = _signal_after(first, 2, signal.SIGTERM)
    assert first.returncode == 75, first.stderr.read()
    stop_line = [line for line in lines if line.startswith("SIGTERM received")]
    step = int(re.search(r"after step (\d+)", stop_line[0]).group(1))
    assert stop_line == [f"SIGTERM received: stopped after step {step} with checkpoint {out}/checkpoint-{step}; "
                         "continue with --resume latest (exit code 75)."]
    assert 2 <= step < 8 and (out / f"checkpoint-{step}" / "state.json").is_file()
    assert not (out / LOCK_NAME).exists() and not (out / "final").exists()

    second = _start(world, out, "22", "--resume", "latest")
    lines = _signal_after(second, step + 2, signal.SIGINT)
    assert second.returncode == 130, second.stderr.read()
    later = int(re.search(r"SIGINT received: stopped after step (\d+)", "\n".join(lines)).group(1))
    assert step + 2 <= later < 8 and (out / f"checkpoint-{later}").is_dir()
    assert not (out / LOCK_NAME).exists()

    third = _start(world, out, "33", "--resume", "latest")
    stdout, stderr = third.communicate(timeout=300)
    assert third.returncode == 0, stderr
    assert f"resumed at step {later}" in stdout and "trained 8 steps" in stdout

    reference = tmp_path / "reference"
    result = runner.invoke(app, _args(world, reference))
    assert result.exit_code == 0, result.output
    for name in ("adapter.safetensors", "student.safetensors"):
        a, b = reference / "final" / name, out / "final" / name
        assert _tensor_sha(a) == _tensor_sha(b), name
        assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest(), name
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "logs" / "losses.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_runs_and_a_signal_in_set_up_releases_the_folder(world, tmp_path):
    out = tmp_path / "busy"
    first = _start(world, out, "5", "--max-steps", "1000")
    try:
        for line in first.stdout:  # training has begun
            if line.startswith("step 1/"):
                break
        result = runner.invoke(app, _args(world, out, "--resume", "latest"))
        assert result.exit_code == 2
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}, since " in result.output
    finally:
        first.send_signal(signal.SIGUSR1)
        first.communicate(timeout=300)
    assert first.returncode == 75 and not (out / LOCK_NAME).exists()

    early = tmp_path / "early"
    proc = _start(world, early, "6")
    deadline = time.time() + 120
    while not (early / LOCK_NAME).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)  # the handlers are installed right after the lock
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert not (early / LOCK_NAME).exists()
    if "before training started" in stderr:
        # the usual case: the teacher was still loading, nothing was written and the folder the run made is gone
        # again; on a loaded machine the signal can come after the prompts were encoded, and the embedding cache
        # the next start reuses stays (and only it)
        left = sorted(p.name for p in early.iterdir()) if early.exists() else []
        assert left in ([], ["embedding-cache"]), left
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(world, tmp_path):
    """``run ... | head -1``: the reader goes away after one line; the run trains on and writes its outputs."""
    out = tmp_path / "piped"
    proc = _start(world, out, "7", "--max-steps", "3")
    first_line = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert first_line.strip()
    assert proc.returncode == 0, stderr
    assert (out / "final" / "adapter.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    assert not (out / LOCK_NAME).exists()


MULTI_WORKER = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from wadi_distill.vsd.preemption import RunStopped
from wadi_distill.vsd.trainer import DistillConfig, VSDTrainer, distill

rank = int(os.environ["RANK"])
real_step = VSDTrainer.train_step

def train_step(self):
    values = real_step(self)
    if rank == 1 and self.step == 2:  # only rank 1 is signalled, in the middle of the run
        os.kill(os.getpid(), signal.SIGTERM)
    return values

VSDTrainer.train_step = train_step
cfg = DistillConfig(**json.loads(sys.argv[1]))
try:
    distill(cfg)
    report = {"finished": True}
except RunStopped as stopped:
    report = {"step": stopped.step, "checkpoint": str(stopped.checkpoint) if stopped.checkpoint else None,
              "code": stopped.exit_code, "signal": stopped.signal_name}
with open(os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), f"rank{rank}.json"), "w") as handle:
    json.dump(report, handle)
"""


@pytest.mark.slow
def test_processes_of_a_launch_stop_after_the_same_step_when_one_is_signalled(world, tmp_path):
    """Two CPU processes (gloo, torchrun): only rank 1 gets SIGTERM; both stop after step 2, rank 0 writes the
    checkpoint, nobody hangs in an all-reduce."""
    out = tmp_path / "runs" / "out"
    config = dict(teacher=str(world["teacher"]), output_dir=str(out), prompts=str(world["prompts"]), rank=4,
                  fake_rank=2, max_steps=6, batch_size=1, checkpointing_steps=100, progress=False,
                  tensorboard=False, final_samples=1, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--no-python", sys.executable, "-c", MULTI_WORKER, json.dumps(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "runs" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == {"step": 2, "checkpoint": str(out / "checkpoint-2"), "code": 75,
                  "signal": "another process's stop signal"}
    assert r1 == {"step": 2, "checkpoint": None, "code": 75, "signal": "SIGTERM"}
    assert (out / "checkpoint-2" / "state.json").is_file() and not (out / "final").exists()
    assert not (out / LOCK_NAME).exists()
