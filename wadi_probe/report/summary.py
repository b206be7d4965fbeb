"""Render a report's summary for a terminal (rich): headline, counts, most-rotated layers, block × type table.

Used by ``wadi-probe compare`` and ``wadi-probe show``; the renderables are plain rich objects so a notebook
can print them too (``rich.print(*summary_renderables(report))``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from wadi_probe.report.schema import Report


def percent(value: float | None, digits: int = 3) -> str:
    """A fraction as a percentage with ``digits`` significant digits (``0.0221`` -> ``2.21 %``); ``-`` for None."""
    if value is None:
        return "-"
    if value == 0:
        return "0 %"
    pct = value * 100
    return f"{pct:.{digits}g} %" if abs(pct) >= 10 ** -(digits - 1) or abs(pct) < 1e-12 else f"{pct:.2e} %"


def degrees(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}°"


def _rank(value: Any) -> str:
    return "-" if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


def _count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


def headline(report: Report) -> Text:
    """The norm-versus-direction sentence (the paper's Fig. 1 finding, for this pair)."""
    s = report.summary
    nc, dc = s.get("norm_change_mean"), s.get("direction_change_mean")
    text = Text()
    if nc is None or dc is None:
        return Text("No weight matrix could be measured (all skipped or none matched).", style="yellow")
    if dc == 0 and nc == 0:
        text.append("Teacher and student weight matrices are identical.", style="bold green")
        return text
    ratio = s.get("direction_to_norm_ratio")
    if ratio is not None and ratio >= 1:
        text.append(f"Direction changed {ratio:.3g}× more than norm", style="bold")
    elif ratio is not None:
        text.append(f"Norm changed {1 / ratio:.3g}× more than direction" if ratio > 0 else "Only norms changed", style="bold")
    else:
        text.append("Only directions changed (norms kept)", style="bold")
    text.append(f" over {s.get('matrices', 0)} weight matrices: ")
    text.append(f"direction change (1−cos) mean {percent(dc)} (std {percent(s.get('direction_change_std'))})", style="magenta")
    text.append(", ")
    text.append(f"norm change mean {percent(nc)} (std {percent(s.get('norm_change_std'))})", style="cyan")
    text.append(f"; mean angle {degrees(s.get('angle_deg_mean'))}.")
    extra = []
    if s.get("residual_energy_at_30pct_rank_mean") is not None:
        extra.append(f"the direction residual keeps {percent(s['residual_energy_at_30pct_rank_mean'])} of its energy at 30 % rank")
    if s.get("lorad_explained_mean") is not None:
        extra.append(f"a pairwise rotation explains {percent(s['lorad_explained_mean'])} of the direction change")
    if s.get("recommended_rank_median") is not None and s.get("lorad_explained_mean") is not None:
        extra.append(
            f"median recommended LoRaD rank {_rank(s['recommended_rank_median'])} "
            f"(≈{(s.get('recommended_params') or 0) / 1e6:.3g}M parameters)"
        )
    if extra:
        text.append("\nOn average " + "; ".join(extra) + ".")
    return text


def counts_line(report: Report) -> Text:
    """Matched / identical / unmatched / skipped counts, with bad rows when there are any."""
    s, p = report.summary, report.pairing
    text = Text()
    text.append(f"{s.get('layers', 0)} tensors compared ({s.get('matrices', 0)} matrices), ")
    text.append(f"{s.get('identical', 0)} identical", style="green")
    text.append(f", {s.get('unmatched', 0)} unmatched")
    unmatched_parts = [
        (len(p.get("shape_mismatch", [])), "shape mismatch"),
        (len(p.get("only_in_teacher", [])), "only in teacher"),
        (len(p.get("only_in_student", [])), "only in student"),
    ]
    details = [f"{n} {what}" for n, what in unmatched_parts if n]
    if details:
        text.append(f" ({', '.join(details)})", style="yellow")
    text.append(f", {s.get('skipped', 0)} skipped")
    if s.get("zero_rows") or s.get("nonfinite"):
        text.append(f"; rows left out: {s.get('zero_rows', 0)} zero, {s.get('nonfinite', 0)} NaN/Inf", style="yellow")
    text.append(".")
    return text


def top_rotated_table(report: Report, top: int = 10) -> Table:
    """The matrices with the largest mean direction change."""
    rows = [r for r in report.layers if len(r.get("shape") or ()) >= 2 and r.get("direction_change_mean") is not None]
    rows.sort(key=lambda r: r["direction_change_mean"], reverse=True)
    table = Table(title=f"Most rotated layers (top {min(top, len(rows))} of {len(rows)} by mean direction change)", title_justify="left")
    cells = [
        (
            r.get("module") or r["name"],
            "×".join(str(n) for n in r["shape"]),
            percent(r["direction_change_mean"]),
            f"{degrees(r.get('angle_deg_mean'))}/{degrees(r.get('angle_deg_max'))}",
            percent(r.get("norm_change_mean")),
            percent(r.get("residual_energy_at_30pct_rank")),
            percent(r.get("lorad_explained")),
            _rank(r.get("recommended_rank")),
        )
        for r in rows[:top]
    ]
    headers = ("layer", "shape", "dir. chg", "angle mean/max", "norm chg", "res. E@30%", "rot. expl.", "rank")
    for index, header in enumerate(headers):
        if header == "layer":
            table.add_column(header, justify="left", overflow="fold", min_width=32, ratio=1)
        else:
            table.add_column(header, justify="right" if index > 1 else "left", no_wrap=True,
                             min_width=_widest(header, cells, index))
    for row in cells:
        table.add_row(*row)
    return table


def _widest(header: str, cells: list[tuple[str, ...]], index: int) -> int:
    """Width of a no-wrap column's longest entry, so that rich's minimum width measures it whole."""
    return max([len(header), *(len(row[index]) for row in cells)])


def groups_table(report: Report) -> Table:
    """Block × layer type: mean changes, spectra and ranks (from ``summary["groups"]``)."""
    table = Table(
        title="By block and layer type (weight matrices; means of per-layer means; res. E@30% = residual energy at "
        "30 % rank, rot. expl. = share of the direction change a pairwise rotation explains, rank = median "
        "recommended LoRaD rank)",
        title_justify="left",
    )
    cells = [
        (
            g["block"], g["layer_type"], str(g["matrices"]), _count(g["params"]),
            percent(g.get("norm_change_mean")), percent(g.get("direction_change_mean")), degrees(g.get("angle_deg_mean")),
            percent(g.get("residual_energy_at_30pct_rank_mean")), percent(g.get("lorad_explained_mean")),
            _rank(g.get("recommended_rank_median")),
        )
        for g in report.summary.get("groups", [])
    ]
    headers = ("block", "layer type", "matrices", "params", "norm chg", "dir. chg", "angle", "res. E@30%", "rot. expl.", "rank")
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < 2 else "right", no_wrap=True,
                         min_width=_widest(header, cells, index))
    for row in cells:
        table.add_row(*row)
    return table


def summary_renderables(report: Report, *, top: int = 10) -> list[RenderableType]:
    """Everything ``wadi-probe show`` prints, as rich renderables."""
    inputs = report.inputs
    teacher, student = inputs.get("teacher", {}), inputs.get("student", {})
    title = Text()
    title.append("teacher ", style="dim")
    title.append(f"{teacher.get('path')} [{teacher.get('layout')}]")
    title.append("\nstudent ", style="dim")
    title.append(f"{student.get('path')} [{student.get('layout')}]")
    parts: list[RenderableType] = [title, headline(report), counts_line(report)]
    if report.layers:
        parts += [top_rotated_table(report, top), groups_table(report)]
    if not report.settings.get("spectra", True):
        parts.append(Text("Spectra were skipped (--no-spectra): ranks and explained fractions are empty.", style="dim"))
    return parts


def print_summary(report: Report, console: Console | None = None, *, top: int = 10) -> None:
    """Print the summary to ``console`` (stdout by default)."""
    console = console or Console()
    for part in summary_renderables(report, top=top):
        _print_unsqueezed(console, part)
        console.print()


def _print_unsqueezed(console: Console, part: RenderableType) -> None:
    """Print a table that would lose text at the console's width (numbers cut to "0.0…", the layer column squeezed
    out: an 80-column or piped console) at its natural width instead, so lines run long rather than information
    being dropped; everything else, and tables that fit, print as usual."""
    if isinstance(part, Table) and _truncated(console, part, console.width):
        width = console.width
        console.width = console.measure(part, options=console.options.update_width(10_000)).maximum
        try:
            console.print(part)
        finally:
            console.width = width
        return
    console.print(part)


def _truncated(console: Console, table: Table, width: int) -> bool:
    lines = console.render_lines(table, console.options.update_width(width), pad=False)
    text = "".join(segment.text for line in lines for segment in line)
    return "…" in text or "┏┳" in text  # an ellipsis, or a first column squeezed to nothing
