"""The one output guard (wadi_probe.io.outputs.check_outputs) and the one sentence for a failed write (atomic_path).

What each kind of test can show, honestly:

- the guard's refusals are plain path logic and are tested directly (symbolic and hard links, folders holding or
  inside inputs, the current folder, two outputs at one place, a path under a regular file);
- a write that fails on the way is made to fail for real with ``ulimit -f`` (``RLIMIT_FSIZE`` in a subprocess;
  Python ignores ``SIGXFSZ``, so the write raises ``EFBIG``), which works as root; a full disk (``ENOSPC``) and a
  read-only mount (``EROFS``) are made with a small tmpfs in a private mount namespace (``unshare -rm``), and those
  tests are skipped where the machine does not allow it. ``chmod`` cannot stand in: root writes anyway.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _tmpfs import in_tmpfs, subprocess_env, unshare_works

from wadi_probe.errors import WadiInputError, WadiWriteError
from wadi_probe.io.atomic import atomic_path, write_failure
from wadi_probe.io.outputs import check_file_name, check_free_space, check_outputs



def _limit_file_size(size: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def _python(code: str, *, fsize: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=subprocess_env(),
                          cwd=cwd, preexec_fn=_limit_file_size(fsize) if fsize else None, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


@pytest.fixture
def inputs(tmp_path):
    """A model folder with a weights file and a config, a lone weights file and a prompt file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"w" * 100)
    (model / "config.json").write_text("{}")
    lone = tmp_path / "student.safetensors"
    lone.write_bytes(b"s" * 50)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    return {"model": model, "lone": lone, "prompts": prompts, "root": tmp_path}


def _refused(outputs, inputs, match: str, **kw) -> None:
    with pytest.raises(WadiInputError, match=match) as info:
        check_outputs(outputs, inputs, **kw)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


# ----------------------------------------------------------------------------------------------- the guard itself
def test_an_output_that_is_or_links_to_an_input_is_refused(inputs, tmp_path):
    ins = [inputs["model"], inputs["lone"], inputs["prompts"]]
    _refused({"record": inputs["prompts"]}, ins, r"record .*prompts.txt is the input")
    _refused({"LoRA": tmp_path / "." / "student.safetensors"}, ins, "is the input")
    link = tmp_path / "link.json"
    link.symlink_to(inputs["prompts"])
    _refused({"record": link}, ins, r"link.json links to the input")  # item 23: a link to an input is not replaced
    folder_link = tmp_path / "model-link"
    folder_link.symlink_to(inputs["model"])
    _refused({"output folder": folder_link}, ins, "links to the input", owned=("output folder",))
    _refused({"report": folder_link / "weights.safetensors"}, ins, "is inside the input")
    hard = tmp_path / "hard.safetensors"
    os.link(inputs["model"] / "weights.safetensors", hard)
    _refused({"hybrid": hard}, ins, "is a hard link to the input")
    check_outputs({"record": tmp_path / "new.json"}, ins)  # a new name is fine


def test_an_output_inside_or_holding_an_input_is_refused(inputs, tmp_path):
    ins = [inputs["model"], inputs["lone"]]
    _refused({"image grid": inputs["model"] / "samples.png"}, ins, "is inside the input")
    _refused({"plots folder": inputs["model"] / "plots"}, ins, "is inside the input", folders=("plots folder",))
    _refused({"output folder": tmp_path}, ins, "holds the input", owned=("output folder",))
    _refused({"merged student folder": tmp_path}, ins, "holds the input", replaced=("merged student folder",),
             overwrite=True)  # never, even with --overwrite
    # a folder that files are only added to may hold inputs: each file it gets is checked by itself
    check_outputs({"plots folder": tmp_path}, ins, folders=("plots folder",))


def test_builtin_inputs_and_links_inside_input_folders_are_protected(tmp_path):
    from wadi_probe.builtins import builtin_path

    shipped = builtin_path("digits").parent
    _refused({"demo folder": shipped}, ["builtin:digits"], "is the input builtin:digits", owned=("demo folder",))
    _refused({"teacher's weights": shipped / "digits_unet.safetensors"}, ["builtin:digits"], "inside the input")
    # a Hugging Face snapshot: the files are links into blobs/, which an output must not hit either
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "1234").write_bytes(b"weights")
    (snapshot / "model.safetensors").symlink_to(blobs / "1234")
    _refused({"LoRA": blobs / "1234"}, [snapshot], "is the input")


def test_folders_written_whole_need_overwrite_and_never_replace_the_current_folder(tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    _refused({"merged student folder": existing}, [], "already exists and is not empty; give --overwrite",
             replaced=("merged student folder",))
    check_outputs({"merged student folder": existing}, [], replaced=("merged student folder",), overwrite=True)
    (tmp_path / "empty").mkdir()
    check_outputs({"merged student folder": tmp_path / "empty"}, [], replaced=("merged student folder",))
    monkeypatch.chdir(existing)
    for here in (".", "..", str(existing)):  # item 12: -o . is refused in one sentence, not a PosixPath('.') error
        _refused({"merged student folder": here}, [], "is the current folder or holds it",
                 replaced=("merged student folder",), overwrite=True)


def test_collisions_wrong_kinds_and_unwritable_places(inputs, tmp_path):
    _refused({"report": tmp_path / "a.json", "CSV": tmp_path / "a.json"}, [], "would both be written to")
    _refused({"report": inputs["model"]}, [], "is a folder; give a file name")
    _refused({"plots folder": inputs["lone"]}, [], "is a file; give a folder", folders=("plots folder",))
    _refused({"record": inputs["lone"] / "x" / "r.json"}, [], r"cannot write the record .* is a file, not a folder")
    _refused({"output folder": "/proc/wadi-out"}, [], "cannot write the output folder", owned=("output folder",))
    check_outputs({"report": None, "CSV": None}, [None, 3.5])  # not asked for, not paths: nothing to check


def test_free_space_is_checked_where_the_size_is_known(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "new" / "merged.safetensors", 1000, "merged student")
    with pytest.raises(WadiInputError, match=r"merged.safetensors needs about .* but only .* are free"):
        check_free_space(tmp_path / "new" / "merged.safetensors", free * 2, "merged student")
    with pytest.raises(WadiInputError, match="needs about"):
        check_outputs({"hybrid": tmp_path / "h.safetensors"}, [], sizes={"hybrid": free * 2})
    assert not (tmp_path / "new").exists()


def test_file_names_made_from_labels_stay_inside_their_folder():
    assert check_file_name("student-1", "label") == "student-1"
    for bad in ("../x", "/abs", "a/b", ".", "..", ".hidden"):
        with pytest.raises(WadiInputError, match="cannot be a file name inside the output folder"):
            check_file_name(bad, "label")
    for empty in ("", " "):
        with pytest.raises(WadiInputError, match="a label must not be empty"):
            check_file_name(empty, "label")


# ----------------------------------------------------------------------------------------------- failed writes
def test_a_write_past_the_file_size_limit_is_one_sentence_and_leaves_the_old_file(tmp_path):
    """ulimit -f in a subprocess: every writer of the project (plain text, safetensors' Rust writer, torch.save,
    a folder of files) fails with EFBIG; each becomes WadiWriteError naming the destination, nothing is left."""
    old = tmp_path / "kept.json"
    old.write_text('{"old": true}\n')
    result = _python(f"""
        import torch
        from safetensors.torch import save_file
        from wadi_probe.errors import WadiWriteError
        from wadi_probe.io.atomic import atomic_path, write_json_atomic
        root = {str(tmp_path)!r}
        cases = {{
            "text": lambda: write_json_atomic(root + "/kept.json", {{"x": "y" * 100000}}),
            "safetensors": lambda: _st(root + "/a.safetensors"),
            "torch": lambda: _pt(root + "/new/deeper/a.pt"),
            "folder": lambda: _folder(root + "/adapter"),
        }}
        def _st(path):
            with atomic_path(path) as tmp:
                save_file({{"w": torch.zeros(100000)}}, str(tmp))
        def _pt(path):
            with atomic_path(path) as tmp:
                torch.save({{"w": torch.zeros(100000)}}, tmp)
        def _folder(path):
            with atomic_path(path, directory=True) as tmp:
                write_json_atomic(tmp / "adapter_config.json", {{"ok": 1}})
                write_json_atomic(tmp / "adapter_weights.json", {{"x": "y" * 100000}})
        for name, case in cases.items():
            try:
                case()
                print(name, "WROTE")
            except WadiWriteError as exc:
                print(name, "|", exc)
    """, fsize=20000)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    limit = "the file would exceed the file-size limit (ulimit -f); nothing was left half-written."
    assert lines["text"] == f"| Could not write {tmp_path}/kept.json: {limit}"
    assert lines["safetensors"] == f"| Could not write {tmp_path}/a.safetensors: {limit}"
    assert lines["torch"] == f"| Could not write {tmp_path}/new/deeper/a.pt: {limit}"  # judged by the place
    assert lines["folder"] == f"| Could not write {tmp_path}/adapter/adapter_weights.json: {limit}"
    assert old.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]  # no temp file, no folder made for it


def test_write_failure_tells_write_errors_from_other_errors(tmp_path):
    final = tmp_path / "out.json"
    full = write_failure(OSError(errno.ENOSPC, "No space left on device"), final)
    assert isinstance(full, WadiWriteError) and str(full) == (
        f"Could not write {final}: no space left on the device; nothing was left half-written.")
    rust = write_failure(RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)"), final)
    assert "the file system is read-only" in str(rust)
    # permission denied while reading some other file (an input) is not this write's failure
    tmp = tmp_path / ".out.json.x.tmp"
    tmp.write_text("")
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"), final, tmp) is None
    assert write_failure(ValueError("bad shape"), final, tmp) is None
    assert write_failure(WadiInputError("tensor 'w' has shape (2,) but (3,) is required."), final, tmp) is None
    assert write_failure(KeyboardInterrupt(), final, tmp) is None


def test_a_failed_folder_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(b"old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_path(folder, directory=True) as tmp:
            (tmp / "w.safetensors").write_bytes(b"new")
    assert (folder / "w.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


needs_tmpfs = pytest.mark.skipif(not unshare_works(), reason="no private mount namespace (unshare -rm) here")


@needs_tmpfs
def test_a_full_disk_and_a_read_only_disk_are_one_sentence(tmp_path):
    full = in_tmpfs(tmp_path / "small", f"""
        from wadi_probe.errors import WadiWriteError
        from wadi_probe.io.atomic import write_json_atomic
        import os
        try:
            write_json_atomic({str(tmp_path / 'small' / 'r.json')!r}, {{"x": "y" * 200000}})
        except WadiWriteError as exc:
            print(exc, os.listdir({str(tmp_path / 'small')!r}))
    """)
    assert full.stdout.strip() == (f"Could not write {tmp_path}/small/r.json: no space left on the device; nothing "
                                   "was left half-written. []"), full.stderr
    readonly = in_tmpfs(tmp_path / "ro", f"""
        from wadi_probe.errors import WadiInputError
        from wadi_probe.io.outputs import check_outputs
        try:
            check_outputs({{"record": {str(tmp_path / 'ro' / 'r.json')!r}}}, [])
        except WadiInputError as exc:
            print(exc)
    """, readonly=True)
    assert readonly.stdout.strip() == (f"cannot write the record {tmp_path}/ro/r.json ({tmp_path}/ro: the file system "
                                       "is read-only); choose another place."), readonly.stderr


@needs_tmpfs
def test_commands_refuse_a_read_only_place_before_any_work(tmp_path):
    """items 8 and 9 on a real read-only mount: evaluate --save-images and train-teacher -o are refused at once
    (train-teacher used to train to the end first)."""
    ro = tmp_path / "ro"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zero\none\n")
    result = in_tmpfs(ro, f"""
        import sys, time
        from wadi_distill.cli import app
        from typer.testing import CliRunner
        runner = CliRunner()
        for args in (["evaluate", "--teacher", "builtin:digits", "--prompts", {str(prompts)!r}, "--reference",
                      "builtin:digits", "--save-images", {str(ro / 'images')!r}, "-o", {str(tmp_path / 'e.json')!r}],
                     ["train-teacher", "-o", {str(ro / 'teacher')!r}, "--steps", "100000"]):
            started = time.perf_counter()
            out = runner.invoke(app, args)
            print(out.exit_code, round(time.perf_counter() - started) < 60, " ".join(out.output.split()))
    """, readonly=True)
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"2 True error: cannot write the generated images folder {ro}/images ({ro}: the file system is read-only); "
        "choose another place.",
        f"2 True error: cannot write the teacher folder {ro}/teacher ({ro}: the file system is read-only); choose "
        "another place.",
    ], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "ro"]


def test_a_stray_write_error_at_the_command_boundary_is_one_sentence(capsys):
    """A writer outside atomic_path (a log file, a folder) refused by the place: handle_errors, exit 2."""
    import typer

    from wadi_probe.console import handle_errors

    @handle_errors
    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "out/logs/events.out")

    @handle_errors
    def a_bug() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(typer.Exit) as info:
        full_disk()
    assert info.value.exit_code == 2
    assert " ".join(capsys.readouterr().err.split()) == "error: out/logs/events.out: no space left on the device."
    with pytest.raises(OSError):  # not a write the place refused: left to surface as the bug it is
        a_bug()
