"""``wadi-probe compare``: probe a teacher against one or several students, save the reports, print the summary.

Every output is checked before the computation (not an input, writable, no two at one place), written
atomically, and written before anything is printed, so a closed pipe (``| head``) never loses a result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from wadi_probe.cli import app
from wadi_probe.console import EXIT_USAGE, Device, console, device_option, err_console, fail, handle_errors
from wadi_probe.errors import WadiInputError
from wadi_probe.text import plural


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``| head``): everything is already written; stop printing quietly.

    rich handles a closed pipe during its own writes (quietly, exit code 1); this covers the final flush.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file descriptor (a test runner's capture)
        pass
    raise typer.Exit(0)


@app.command("compare")
@handle_errors
def compare_command(
    teacher: str = typer.Argument(..., metavar="TEACHER", help="Teacher checkpoint: .safetensors, diffusers folder, LDM single file, torch .bin/.pt/.ckpt, or builtin:digits."),
    students: List[str] = typer.Argument(..., metavar="STUDENT", help="One or more students (any of the teacher's layouts, or LoRA/LoRaD adapters, detected)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report file (one student) or folder (several: LABEL.json per student, summary.json, summary.csv)."),
    labels: Optional[List[str]] = typer.Option(None, "--label", help="A name per student (repeat; default: file or folder names)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the per-layer table as CSV here (one student)."),
    device: Device = device_option(),
    include: Optional[str] = typer.Option(None, "--include", help="Only tensors whose name matches this regex."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Leave out tensors whose name matches this regex."),
    no_spectra: bool = typer.Option(False, "--no-spectra", help="Skip residual and rotation spectra (much faster)."),
    adapter: bool = typer.Option(False, "--adapter", help="Every STUDENT is an adapter merged onto TEACHER (otherwise detected)."),
    partial: bool = typer.Option(False, "--partial", help="Compare what matches even when most tensors do not pair up or the weights look unrelated."),
    explained_at_rank: bool = typer.Option(
        False, "--explained-at-rank", help="Also report how much of the direction change LoRaD at the recommended rank explains (slower)."
    ),
    top: int = typer.Option(10, "--top", help="How many of the most rotated layers to list."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Also write the figures (PNG and SVG) into this folder."),
) -> None:
    """Compare TEACHER with each STUDENT: per-layer norm and direction change, angles, spectra against chance,
    LoRaD rank advice."""
    from wadi_probe.analyze import compare_many, default_labels
    from wadi_probe.io.outputs import check_file_name, check_outputs

    many = len(students) > 1
    names = list(labels) if labels else default_labels(students)
    if len(names) != len(students):
        raise WadiInputError(f"{len(names)} --label for {len(students)} students; give one per student or none.")
    if many and csv is not None:
        raise WadiInputError("--csv writes one student's layer table; with several students -o OUT/ gets summary.csv.")
    if many and output is not None and output.suffix == ".json":
        raise WadiInputError(f"with several students -o names a folder (LABEL.json per student), not {output}.")
    outputs: dict[str, Optional[Path]] = {"report folder" if many else "report": output, "CSV": csv, "plots folder": plots}
    if many and output is not None:
        for label in names:  # a label is a file name inside OUT: ../x or /abs would write elsewhere
            outputs[f"report of {label}"] = output / f"{check_file_name(label, 'label')}.json"
        outputs["summary"], outputs["summary table"] = output / "summary.json", output / "summary.csv"
    check_outputs(outputs, [teacher, *students], folders=("report folder", "plots folder"))

    from wadi_probe.heap import reuse_freed_memory

    with reuse_freed_memory():  # a process-wide allocator setting: the command line's choice, not the library's
        result = compare_many(
            teacher, students, labels=names, device=device.value, include=include, exclude=exclude,
            spectra=not no_spectra, progress=progress, adapters=[True] * len(students) if adapter else None,
            explained_at_rank=explained_at_rank, partial=partial, refuse_one_by_one=many,
        )
    if not result.reports:
        reasons = "; ".join(f"{label}: {why.rstrip('.')}" for label, why in result.refused.items())
        raise WadiInputError(f"no student could be compared: {reasons}.")
    written = _write(result, names, teacher, output, csv, plots, many)
    try:
        _print(result, written, top, many)
    except BrokenPipeError:
        _quiet_broken_pipe()
    if result.refused:  # the others are written, but a script must see that not every student was compared
        count = len(result.refused)
        fail(f"{count} of {len(students)} students {'was' if count == 1 else 'were'} refused "
             f"({', '.join(result.refused)}); the other reports are written.", EXIT_USAGE)


def _write(result, names, teacher, output, csv, plots, many) -> list[str]:
    """Write every requested output (before anything is printed); returns the lines that say what was written."""
    lines: list[str] = []
    if not many:
        report = result.reports[names[0]]
        if output is not None:
            report.save(output)
            lines.append(f"report written to {output}")
        if csv is not None:
            report.to_csv(csv)
            lines.append(f"layer table written to {csv}")
        if plots is not None:
            from wadi_probe.report.plots import save_all_plots

            lines += saved_lines(save_all_plots(report, plots), plots)
        return lines
    if output is not None:
        from wadi_probe.report.combined import write_combined

        paths = {}
        for label, report in result.reports.items():
            paths[label] = str(report.save(output / f"{label}.json"))
        json_path, csv_path = write_combined(result.table(), result.refused, output, teacher=str(teacher), reports=paths)
        lines.append(f"{plural(len(paths), 'report')}, {json_path.name} and {csv_path.name} written to {output}")
    if plots is not None:
        from wadi_probe.report.plots import save_comparison_plots

        lines += saved_lines(save_comparison_plots(list(result.reports.values()), list(result.reports), plots), plots)
    return lines


def saved_lines(saved, out_dir: Path) -> list[str]:
    """What :func:`wadi_probe.report.plots.save_all_plots` wrote and skipped, as lines to print."""
    stems = list(dict.fromkeys(p.stem for p in saved.files))
    suffixes = "/".join(dict.fromkeys(p.suffix.lstrip(".") for p in saved.files))
    lines = [f"wrote {len(saved.files)} files to {out_dir} ({suffixes}): {', '.join(stems)}"] if saved.files else []
    lines += [f"skipped {name}: {why}" for name, why in saved.skipped]
    return lines


def _print(result, written: list[str], top: int, many: bool) -> None:
    from wadi_probe.report.summary import print_summary

    if many:
        from wadi_probe.report.combined import combined_table
        from wadi_probe.report.summary import print_renderables

        print_renderables(combined_table(result.table()), console)
        for label, why in result.refused.items():
            err_console.print(f"refused {label}: {why}", highlight=False, style="yellow", soft_wrap=True)
        console.print(f"the teacher was read once for {plural(len(result.reports), 'student')} "
                      f"({result.teacher_reads} tensors) in {result.elapsed_s:.1f} s", highlight=False)
    else:
        print_summary(next(iter(result.reports.values())), console, top=top)
    for line in written:
        console.print(line, highlight=False, soft_wrap=True)
    sys.stdout.flush()
