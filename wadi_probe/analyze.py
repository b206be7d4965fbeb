"""Stream matched teacher/student tensor pairs through the §4 math and collect a :class:`~wadi_probe.report.schema.Report`.

Only one pair of tensors is in memory at a time (read, moved to the device, analysed, freed), so a full SD
checkpoint is probed in far less memory than loading either file whole.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_probe.device import resolve_device
from wadi_probe.io.checkpoints import Checkpoint, open_checkpoint
from wadi_probe.io.names import MODEL_PREFIXES, WRAPPER_PREFIXES, strip_prefixes
from wadi_probe.decompose import AnalysisSettings, analyze_pair
from wadi_probe.errors import WadiInputError
from wadi_probe.io.formats.torch_io import DictSource
from wadi_probe.layers import block_of, kind_of, layer_type_of, module_of
from wadi_probe.pairing import pair_checkpoints
from wadi_probe.report.schema import Report, build_report


def checkpoint_from_state_dict(tensors: Mapping[str, torch.Tensor] | torch.nn.Module, label: str = "<memory>") -> Checkpoint:
    """Wrap a state dict (or a module's) as a :class:`Checkpoint`, stripping ``module.``/``unet.`` prefixes."""
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.state_dict()
    source = DictSource(tensors, label)
    names: dict[str, str] = {}
    for key in source.keys():
        names[strip_prefixes(key, WRAPPER_PREFIXES + MODEL_PREFIXES)] = key
    return Checkpoint(Path(label), "memory", {name: (source, key) for name, key in names.items()}, sources=[source])


def _open(spec: Any, label: str, *, base: Checkpoint | None = None) -> tuple[Checkpoint, bool]:
    """Open a checkpoint-like thing; returns (checkpoint, opened_here) so the caller knows what to close."""
    if isinstance(spec, Checkpoint):
        return spec, False
    if isinstance(spec, (Mapping, torch.nn.Module)):
        return checkpoint_from_state_dict(spec, label), True
    if isinstance(spec, (str, Path)):
        return open_checkpoint(spec, base=base), True
    raise WadiInputError(f"cannot read the {label} from a {type(spec).__name__}; give a path, a Checkpoint or a state dict.")


def _describe(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"path": str(checkpoint.path), "layout": checkpoint.layout, "tensors": len(checkpoint)}


def compare(
    teacher: Any,
    student: Any,
    *,
    device: str | torch.device = "auto",
    include: str | None = None,
    exclude: str | None = None,
    spectra: bool = True,
    progress: bool = False,
    student_is_adapter: bool = False,
    explained_at_rank: bool = False,
    settings: AnalysisSettings | None = None,
    on_layer: Callable[[dict[str, Any]], None] | None = None,
) -> Report:
    """Compare a teacher and a student layer by layer (docs/design.md, "The probe") and return the report.

    ``teacher``/``student``: a path (any layout :func:`~wadi_probe.io.checkpoints.open_checkpoint` reads), an open
    :class:`Checkpoint`, a state dict or an ``nn.Module``. With ``student_is_adapter`` the student is an adapter
    file merged onto the teacher. ``include``/``exclude`` are regexes on tensor names; ``spectra=False`` skips the
    residual and pair-angle spectra (the fast mode). ``explained_at_rank`` also fills
    ``lorad_explained_at_recommended_rank`` (an eigen-decomposition with vectors per layer: slower). ``progress``
    shows a rich progress bar on stderr. ``settings`` overrides all analysis options at once.
    """
    settings = settings or AnalysisSettings(spectra=spectra, truncated_explained=explained_at_rank)
    target = resolve_device(device)
    started = time.perf_counter()
    teacher_ckpt, close_teacher = _open(teacher, "teacher")
    student_ckpt, close_student = None, False
    try:
        student_ckpt, close_student = _open(student, "student", base=teacher_ckpt if student_is_adapter else None)
        pairing = pair_checkpoints(teacher_ckpt, student_ckpt, include=include, exclude=exclude)
        records = _analyze_all(teacher_ckpt, student_ckpt, pairing.matched, settings, target, progress, on_layer)
        inputs = {"teacher": _describe(teacher_ckpt), "student": _describe(student_ckpt)}
    finally:
        if close_student and student_ckpt is not None:
            student_ckpt.close()
        if close_teacher:
            teacher_ckpt.close()
    report_settings = {"device": str(target), "include": include, "exclude": exclude, **settings.to_json()}
    report = build_report(inputs=inputs, settings=report_settings, pairing=pairing.to_dict(), layers=records)
    report.data["run"] = {
        "elapsed_s": round(time.perf_counter() - started, 3),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
    }
    return report


def _analyze_all(
    teacher: Checkpoint,
    student: Checkpoint,
    names: list[str],
    settings: AnalysisSettings,
    device: torch.device,
    progress: bool,
    on_layer: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Analyse pairs one at a time (read, compute, free), optionally behind a progress bar."""
    sizes = [max(1, _numel(teacher.shape(name))) for name in names]
    records: list[dict[str, Any]] = []
    if not progress:
        for order, name in enumerate(names):
            records.append(_analyze_one(teacher, student, name, order, settings, device))
            if on_layer:
                on_layer(records[-1])
        return records

    from wadi_probe.console import progress_bar

    layer_task_total = sum(sizes)
    with progress_bar("probing (share of weights)", "layer", percent=True) as bar:
        task = bar.add_task("probe", total=layer_task_total, layer="")
        done = 0
        for order, (name, size) in enumerate(zip(names, sizes)):
            bar.update(task, layer=name)
            records.append(_analyze_one(teacher, student, name, order, settings, device))
            if on_layer:
                on_layer(records[-1])
            done += size
            bar.update(task, completed=done)
    return records


#: Layers smaller than this run single-threaded on the CPU: their work is too small to share between threads, and
#: on a busy machine the thread hand-offs of many small operations cost more than the arithmetic (measured: a
#: 5M-parameter pair took 7 s with one thread and 90–120 s with two on 2 shared, oversubscribed cores).
SINGLE_THREAD_BELOW = 1 << 21


@contextlib.contextmanager
def _threads_for(numel: int, device: torch.device) -> Iterator[None]:
    """Run small CPU layers with one intra-op thread; restore the caller's setting afterwards."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or numel >= SINGLE_THREAD_BELOW or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _analyze_one(
    teacher: Checkpoint, student: Checkpoint, name: str, order: int, settings: AnalysisSettings, device: torch.device
) -> dict[str, Any]:
    shape = tuple(int(n) for n in teacher.shape(name))
    t = teacher.tensor(name)
    s = student.tensor(name)
    record: dict[str, Any] = {
        "name": name,
        "module": module_of(name),
        "kind": kind_of(name, shape),
        "layer_type": layer_type_of(name, shape),
        "block": block_of(name),
        "order": order,
        "shape": list(shape),
        "params": _numel(shape),
        "dtype": str(t.dtype).removeprefix("torch."),
    }
    if s.dtype != t.dtype:
        record["student_dtype"] = str(s.dtype).removeprefix("torch.")
    with _threads_for(record["params"], device):
        record.update(analyze_pair(t, s, settings, device=device))
    del t, s
    return record
