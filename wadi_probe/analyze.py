"""Stream matched teacher/student tensor pairs through the §4 math and collect a :class:`~wadi_probe.report.schema.Report`.

Only one pair of tensors is in memory at a time (read, moved to the device, analysed, freed), so a full SD
checkpoint is probed in far less memory than loading either file whole.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_probe.device import resolve_device
from wadi_probe.io.checkpoints import AdapterWithoutBase, Checkpoint, open_checkpoint
from wadi_probe.io.names import MODEL_PREFIXES, WRAPPER_PREFIXES, strip_prefixes
from wadi_probe.decompose import AnalysisSettings, analyze_pair
from wadi_probe.errors import WadiInputError
from wadi_probe.io.formats.torch_io import DictSource
from wadi_probe.layers import block_of, kind_of, layer_type_of, module_of
from wadi_probe.builtins import is_builtin, resolve_builtin
from wadi_probe.pairing import Pairing, pair_checkpoints
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
        try:
            return open_checkpoint(resolve_builtin(spec), base=base), True
        except AdapterWithoutBase as exc:
            if label != "teacher":
                raise
            raise WadiInputError(f"the teacher {exc.path} is an adapter (LoRA/LoRaD weights), not a full model; give the "
                                 "teacher's full weights as TEACHER and the adapter as a STUDENT (it is merged onto "
                                 "the teacher).") from exc
    raise WadiInputError(f"cannot read the {label} from a {type(spec).__name__}; give a path, a Checkpoint or a state dict.")


def _describe(checkpoint: Checkpoint, spec: Any = None) -> dict[str, Any]:
    """The report's record of an input: its path as given (a built-in name stays a name), layout, tensor count."""
    path = spec if is_builtin(spec) else str(checkpoint.path)
    return {"path": path, "layout": checkpoint.layout, "tensors": len(checkpoint)}


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
    partial: bool = False,
) -> Report:
    """Compare a teacher and a student layer by layer (docs/design.md, "The probe") and return the report.

    ``teacher``/``student``: a path (any layout :func:`~wadi_probe.io.checkpoints.open_checkpoint` reads, or a
    built-in name such as ``builtin:digits``), an open :class:`Checkpoint`, a state dict or an ``nn.Module``.
    With ``student_is_adapter`` the student is an adapter file merged onto the teacher. ``include``/``exclude``
    are regexes on tensor names; ``spectra=False`` skips the residual and pair-angle spectra (the fast mode).
    ``explained_at_rank`` also fills ``lorad_explained_at_recommended_rank`` (an eigen-decomposition with vectors
    per layer: slower). ``progress`` shows a rich progress bar on stderr. ``settings`` overrides all analysis
    options at once.

    A pair that mostly does not pair up by name and shape, or whose weights look unrelated (mean angle above
    :data:`UNRELATED_ANGLE_DEG`), raises :class:`WadiInputError` unless ``partial`` asks for a comparison of
    whatever matched.
    """
    result = compare_many(
        teacher, [student], labels=["student"], device=device, include=include, exclude=exclude, spectra=spectra,
        progress=progress, adapters=[True] if student_is_adapter else None, explained_at_rank=explained_at_rank,
        settings=settings, on_layer=on_layer, partial=partial, refuse_one_by_one=False,
    )
    return result.reports["student"]


@dataclass
class ManyResult:
    """What :func:`compare_many` produced: one report per compared student (by label) and the refused ones."""

    reports: dict[str, Report] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    teacher_reads: int = 0

    def table(self) -> list[dict[str, Any]]:
        """One row per student: the summary fields the side-by-side table shows (:func:`summary_row`)."""
        return [summary_row(label, report) for label, report in self.reports.items()]


#: The columns of the side-by-side summary (``summary.json``/``summary.csv``), all from a report's summary.
SUMMARY_COLUMNS = (
    "label", "student", "matrices", "angle_to_norm_ratio", "paper_direction_to_norm_ratio", "angle_rad_mean",
    "angle_deg_mean", "norm_change_mean", "norm_change_layer_std", "residual_energy_at_30pct_rank_mean",
    "residual_energy_at_30pct_rank_chance_mean", "residual_energy_at_30pct_rank_excess_mean", "lorad_explained_mean",
    "lorad_explained_chance_mean", "lorad_explained_excess_mean", "recommended_rank_median", "recommended_params",
    "identical", "unmatched", "rounding_level",
)


def summary_row(label: str, report: Report) -> dict[str, Any]:
    """The side-by-side row of one student: :data:`SUMMARY_COLUMNS` read from its report's summary."""
    s = report.summary
    row: dict[str, Any] = {"label": label, "student": report.inputs["student"]["path"]}
    for key in SUMMARY_COLUMNS[2:]:
        row[key] = (s.get("precision") or {}).get("rounding_level") if key == "rounding_level" else s.get(key)
    return row


def default_labels(students: Sequence[Any]) -> list[str]:
    """Labels from the students' file or folder names (``dmd2.safetensors`` -> ``dmd2``), made unique."""
    labels: list[str] = []
    for index, spec in enumerate(students):
        if isinstance(spec, (str, Path)):
            text = str(spec).rstrip("/")
            base = text.split(":", 1)[1] if is_builtin(text) else Path(text).name
            base = base.removesuffix(".safetensors").removesuffix(".ckpt").removesuffix(".bin").removesuffix(".pt")
        else:
            base = f"student{index + 1}"
        name, n = base or f"student{index + 1}", 2
        while name in labels:
            name, n = f"{base}-{n}", n + 1
        labels.append(name)
    return labels


def _open_student(spec: Any, teacher: Checkpoint, adapter: bool | None) -> tuple[Checkpoint, bool]:
    """Open a student; an adapter (LoRA/LoRaD) is merged onto the teacher, detected when ``adapter`` is None."""
    if adapter:
        return _open(spec, "student", base=teacher)
    try:
        return _open(spec, "student")
    except AdapterWithoutBase:
        # The checkpoint reader refuses an adapter opened without a base; with a teacher at hand, merge it.
        if adapter is None and isinstance(spec, (str, Path)):
            return _open(spec, "student", base=teacher)
        raise


#: A student that opened and paired with the teacher: (label, checkpoint, opened_here, pairing).
_Opened = tuple[str, Checkpoint, bool, Pairing]


def compare_many(
    teacher: Any,
    students: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    include: str | None = None,
    exclude: str | None = None,
    spectra: bool = True,
    progress: bool = False,
    adapters: Sequence[bool] | None = None,
    explained_at_rank: bool = False,
    settings: AnalysisSettings | None = None,
    on_layer: Callable[[dict[str, Any]], None] | None = None,
    partial: bool = False,
    refuse_one_by_one: bool = True,
) -> ManyResult:
    """Compare several students against one teacher, reading each teacher tensor once for all of them.

    Students may be full checkpoints, merged files or adapters (detected, or forced per student by
    ``adapters``), in any layout; ``labels`` default to their file or folder names. Layers stream one at a
    time: memory holds one teacher tensor and the students' tensors of that layer. A student that does not pair
    with the teacher (another architecture) or looks unrelated is refused with a sentence in
    ``result.refused`` while the rest are compared; with ``refuse_one_by_one=False`` it raises instead.
    """
    labels = _checked_labels(students, labels)
    adapters = list(adapters) if adapters is not None else [None] * len(students)
    settings = settings or AnalysisSettings(spectra=spectra, truncated_explained=explained_at_rank)
    target = resolve_device(device)
    started = time.perf_counter()
    result = ManyResult()
    teacher_ckpt, close_teacher = _open(teacher, "teacher")
    opened: list[_Opened] = []
    try:
        _open_and_pair(teacher_ckpt, zip(labels, students, adapters), opened, result.refused, include=include,
                       exclude=exclude, partial=partial, refuse_one_by_one=refuse_one_by_one)
        records: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in opened}
        names = [n for n in teacher_ckpt.names() if any(n in set(p.matched) for *_, p in opened)] if opened else []
        matched = {label: set(p.matched) for label, _, _, p in opened}
        result.teacher_reads = _analyze_all(teacher_ckpt, [(label, ckpt) for label, ckpt, _, _ in opened], names,
                                            matched, settings, target, progress, on_layer, records)
        teacher_info = _describe(teacher_ckpt, teacher)
        student_info = {label: _describe(ckpt, spec) for (label, ckpt, _, _), spec in
                        zip(opened, [s for label, s in zip(labels, students) if label in records])}
    finally:
        _close_opened(opened, teacher_ckpt, close_teacher)
    report_settings = {"device": str(target), "include": include, "exclude": exclude, "partial": partial,
                       **settings.to_json()}
    elapsed = round(time.perf_counter() - started, 3)
    for label, _, _, pairing in opened:
        report = build_report(inputs={"teacher": teacher_info, "student": student_info[label]}, settings=report_settings,
                              pairing=pairing.to_dict(), layers=records[label])
        if _kept_as_related(report, label, result.refused, partial=partial, refuse_one_by_one=refuse_one_by_one):
            report.data["run"] = _run_record(elapsed, len(opened), target)
            result.reports[label] = report
    result.elapsed_s = elapsed
    return result


def _checked_labels(students: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    """One distinct label per student (the given ones, or :func:`default_labels`); refuses an empty student list."""
    if not students:
        raise WadiInputError("give at least one student to compare with the teacher.")
    labels = list(labels) if labels else default_labels(students)
    if len(labels) != len(students):
        raise WadiInputError(f"{len(labels)} labels for {len(students)} students; give one --label per student.")
    if any(not str(label).strip() for label in labels):
        raise WadiInputError("a label must not be empty: it names the student's report (LABEL.json) and its row.")
    if len(set(labels)) != len(labels):
        raise WadiInputError(f"the labels must differ, got {', '.join(labels)}.")
    return labels


def _open_and_pair(
    teacher: Checkpoint,
    specs: Iterable[tuple[str, Any, bool | None]],
    opened: list[_Opened],
    refused: dict[str, str],
    *,
    include: str | None,
    exclude: str | None,
    partial: bool,
    refuse_one_by_one: bool,
) -> None:
    """Open each (label, student, adapter) and pair it with the teacher, appending it to ``opened``.

    A student that does not open or pair is closed again and refused with its sentence in ``refused`` (or, with
    ``refuse_one_by_one`` off, raises). ``opened`` is the caller's list so that the caller closes whatever was
    opened even when this raises part way.
    """
    for label, spec, adapter in specs:
        try:
            checkpoint, close = _open_student(spec, teacher, adapter)
        except WadiInputError as exc:
            if not refuse_one_by_one:
                raise
            refused[label] = str(exc)
            continue
        try:
            pairing = pair_checkpoints(teacher, checkpoint, include=include, exclude=exclude, partial=partial)
        except WadiInputError as exc:
            if close:
                checkpoint.close()
            if not refuse_one_by_one:
                raise
            refused[label] = str(exc)
            continue
        opened.append((label, checkpoint, close, pairing))


def _close_opened(opened: Sequence[_Opened], teacher: Checkpoint, close_teacher: bool) -> None:
    """Close the students' and then the teacher's checkpoints that this run opened (not the caller's own)."""
    for _, checkpoint, close, _ in opened:
        if close:
            checkpoint.close()
    if close_teacher:
        teacher.close()


def _kept_as_related(report: Report, label: str, refused: dict[str, str], *, partial: bool, refuse_one_by_one: bool) -> bool:
    """Whether a student's report passes :func:`check_related`; if not, its sentence goes to ``refused`` (or,
    with ``refuse_one_by_one`` off, the refusal raises)."""
    try:
        check_related(report, partial=partial)
    except WadiInputError as exc:
        if not refuse_one_by_one:
            raise
        refused[label] = str(exc)
        return False
    return True


def _run_record(elapsed: float, students_in_run: int, target: torch.device) -> dict[str, Any]:
    """The report's ``run`` section: how long the run took, for how many students, with which torch and device."""
    return {
        "elapsed_s": elapsed,
        "students_in_run": students_in_run,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
    }


#: A mean angle between teacher and student rows above this (degrees) means the weights are unrelated: two
#: independent random matrices sit at 90°, a distilled student a few degrees from its teacher.
UNRELATED_ANGLE_DEG = 60.0


def check_related(report: Report, *, partial: bool = False) -> None:
    """Refuse a report whose weights look unrelated (mean angle over matrices above 60°) unless ``partial``."""
    angle = report.summary.get("angle_deg_mean")
    if angle is not None and angle > UNRELATED_ANGLE_DEG and not partial:
        inputs = report.inputs
        raise WadiInputError(
            f"{inputs['teacher']['path']} and {inputs['student']['path']} look unrelated: their weight rows are "
            f"{angle:.3g}° apart on average (independent weights give 90°, a distilled student a few degrees); "
            "pass --partial (partial=True) to compare them anyway."
        )


def _analyze_all(
    teacher: Checkpoint,
    students: list[tuple[str, Checkpoint]],
    names: list[str],
    matched: dict[str, set[str]],
    settings: AnalysisSettings,
    device: torch.device,
    progress: bool,
    on_layer: Callable[[dict[str, Any]], None] | None,
    records: dict[str, list[dict[str, Any]]],
) -> int:
    """Analyse layer by layer: read the teacher tensor once, then each student's of that layer; returns the reads."""
    sizes = [max(1, _numel(teacher.shape(name))) for name in names]
    reads = 0

    def one_layer(name: str) -> None:
        nonlocal reads
        t = teacher.tensor(name)
        reads += 1
        for label, student in students:
            if name in matched[label]:
                records[label].append(_analyze_one(t, student, name, len(records[label]), settings, device))
                if on_layer:
                    on_layer(records[label][-1])
        del t

    if not progress:
        for name in names:
            one_layer(name)
        return reads

    from wadi_probe.console import progress_bar

    with progress_bar("probing (share of weights)", "layer", percent=True) as bar:
        task = bar.add_task("probe", total=sum(sizes), layer="")
        done = 0
        for name, size in zip(names, sizes):
            bar.update(task, layer=name)
            one_layer(name)
            done += size
            bar.update(task, completed=done)
    return reads


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
    t: torch.Tensor, student: Checkpoint, name: str, order: int, settings: AnalysisSettings, device: torch.device
) -> dict[str, Any]:
    shape = tuple(int(n) for n in t.shape)
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
    del s
    return record
