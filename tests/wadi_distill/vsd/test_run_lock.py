"""One run per output folder: OUT/run.lock is taken atomically, names its holder, and stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wadi_distill.cli import app
from wadi_distill.vsd.run_lock import LOCK_NAME, RunLock, lock_run_folder, process_start_ticks, read_holder
from wadi_probe.errors import WadiInputError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "command": "wadi-distill run -o x", "token": "t0", "pid_started": process_start_ticks(os.getpid())}
    record.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


@pytest.fixture
def ended_pid() -> int:
    """The pid of a process that has ended (this host)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_records_holder_and_release_removes_it(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out, command="wadi-distill run -o run").acquire()
    holder = read_holder(out)
    assert (holder.host, holder.pid, holder.command) == (socket.gethostname(), os.getpid(), "wadi-distill run -o run")
    assert holder.started.endswith("+00:00") and holder.pid_started == process_start_ticks(os.getpid())
    assert lock.created_folder and lock.held
    (out / "kept.txt").write_text("x")
    lock.release()
    lock.release()  # idempotent
    assert not (out / LOCK_NAME).exists() and (out / "kept.txt").is_file()


def test_a_folder_the_lock_made_is_removed_again_when_nothing_was_written(tmp_path):
    with RunLock(tmp_path / "a" / "b") as lock:
        assert (tmp_path / "a" / "b" / LOCK_NAME).is_file() and lock.created_folder
    assert not (tmp_path / "a" / "b").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with RunLock(existing):
        pass
    assert existing.is_dir() and not any(existing.iterdir())


def test_second_lock_on_a_live_holder_is_refused_with_its_host_pid_and_start(tmp_path):
    out = tmp_path / "run"
    first = RunLock(out).acquire()
    before = _snapshot(out)
    with pytest.raises(WadiInputError) as refused:
        RunLock(out).acquire()
    message = str(refused.value)
    holder = read_holder(out)
    assert f"host {holder.host}, pid {holder.pid}, since {holder.started}" in message
    assert message.count(".") >= 1 and "\n" not in message
    assert "delete" not in message  # a live holder on this host: never suggest deleting its lock
    assert _snapshot(out) == before
    first.release()
    assert RunLock(out).acquire().held


def test_stale_lock_of_an_ended_process_is_taken_over_with_one_note(tmp_path, ended_pid):
    out = tmp_path / "run"
    _write_lock(out, pid=ended_pid, pid_started=None)
    notes: list[str] = []
    lock = RunLock(out, note=notes.append).acquire()
    assert read_holder(out).pid == os.getpid() and lock.held
    assert len(notes) == 1 and f"pid {ended_pid}" in notes[0] and "stale" in notes[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the stale lock was not left aside


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path):
    out = tmp_path / "run"
    if process_start_ticks(os.getpid()) is None:
        pytest.skip("no /proc on this system")
    # this pid is alive, but the lock says it belonged to a process that started at another time
    _write_lock(out, pid_started=process_start_ticks(os.getpid()) - 1)
    notes: list[str] = []
    assert RunLock(out, note=notes.append).acquire().held
    assert len(notes) == 1


def test_lock_of_another_host_is_never_assumed_stale(tmp_path, ended_pid):
    out = tmp_path / "run"
    path = _write_lock(out, host="node-17.cluster", pid=ended_pid)
    with pytest.raises(WadiInputError) as refused:
        RunLock(out).acquire()
    assert "host node-17.cluster" in str(refused.value)
    assert f"delete {path}" in str(refused.value)
    assert read_holder(out).host == "node-17.cluster"


def test_a_file_this_tool_did_not_write_is_refused_not_deleted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("not json")
    with pytest.raises(WadiInputError, match="not a lock this tool wrote"):
        RunLock(out).acquire()
    assert (out / LOCK_NAME).read_text() == "not json"


def test_release_leaves_a_lock_someone_else_took(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    _write_lock(out, token="someone-else")  # e.g. deleted by hand and taken by a new run
    lock.release()
    assert read_holder(out).token == "someone-else"


def test_only_the_main_process_of_a_launch_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    lock = lock_run_folder(tmp_path / "run")
    assert not lock.held and not (tmp_path / "run").exists()
    lock.release()
    monkeypatch.setenv("RANK", "0")
    assert lock_run_folder(tmp_path / "run").held


def test_cli_run_into_a_locked_folder_is_refused_in_one_sentence_and_touches_nothing(tmp_path):
    """The refusal comes before the teacher is loaded: the holder is a live process, the folder stays as it was."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "run"
        _write_lock(out, pid=holder.pid, pid_started=process_start_ticks(holder.pid))
        (out / "logs").mkdir()
        (out / "logs" / "losses.jsonl").write_text('{"step": 1}\n')
        before = _snapshot(out)
        result = CliRunner().invoke(app, ["run", "--teacher", "builtin:digits", "--output-dir", str(out), "--rank",
                                          "2", "--max-steps", "1", "--device", "cpu", "--resume", "latest"])
        assert result.exit_code == 2, result.output
        assert f"pid {holder.pid}" in result.output and "in use by another run" in result.output
        assert "Traceback" not in result.output
        assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
