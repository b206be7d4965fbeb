"""Render a report's summary for a terminal (rich): headline, counts, most-rotated layers, block × type table.

Used by ``wadi-probe compare`` and ``wadi-probe show``; the renderables are plain rich objects so a notebook
can print them too (``rich.print(*summary_renderables(report))``).
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
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
    return f"{pct:.{digits}g} %" if abs(pct) >= 10 ** -(digits - 1) else f"{_short_exp(pct)} %"


def _short_exp(value: float) -> str:
    """``1.6e-6`` rather than ``1.61e-06``: two significant digits, no exponent padding (tables stay narrow);
    ``nan``/``inf`` as such (a report may hold them where a statistic was undefined)."""
    if not math.isfinite(value):
        return str(value)
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def degrees(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}°" if value == 0 or abs(value) >= 0.01 else f"{_short_exp(value)}°"


def compact_table(title: str, *, tight: bool = False) -> Table:
    """A table with a rule under the header only and two spaces between columns (one when ``tight``), so that
    80 columns hold it."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0 if tight else 1),
                 collapse_padding=True, pad_edge=False, show_edge=False)


def _rank(value: Any) -> str:
    return "-" if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


def _count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


def _ratio(value: float) -> str:
    return f"{value:.3g}×"


def _names_text(names: list[str], total: int) -> str:
    shown = ", ".join(names)
    return shown + (f" and {total - len(names)} more" if total > len(names) else "")


def _points(value: float) -> str:
    return f"{value * 100:+.3g} points"


def headline(report: Report) -> Text:
    """The sideways-versus-radial sentence (the paper's Fig. 1 finding, for this pair), in first-order terms.

    Sideways movement is the mean angle in radians (a row of length 1 turned by θ moves θ sideways), radial
    movement the mean relative norm change; the paper's second-order 1 − cos ratio follows, labelled as the
    paper's. Every spectral number is printed beside its chance value, and "low-rank"/"rotational" is said only
    above chance.
    """
    s = report.summary
    nc, dc, rad = s.get("norm_change_mean"), s.get("direction_change_mean"), s.get("angle_rad_mean")
    text = Text()
    if nc is None or dc is None:
        return Text("No weight matrix could be measured (all skipped or none matched).", style="yellow")
    matrices = s.get("matrices", 0)
    partly = " that were compared" if s.get("unmatched") else ""
    if dc == 0 and nc == 0:
        text.append(f"The {matrices} teacher and student weight matrices{partly} are identical.",
                    style="bold green" if not partly else "bold yellow")
        return _append_context(text, s)
    precision = s.get("precision") or {}
    eps = precision.get("rounding_angle_rad")
    norm_round, angle_round = s.get("norm_change_at_rounding_level"), s.get("angle_at_rounding_level")
    angle_text = f"mean angle {rad:.3g} rad ({degrees(s.get('angle_deg_mean'))})" if rad is not None else "mean angle -"
    norm_text = f"mean relative norm change {percent(nc)}"
    if norm_round and angle_round:
        text.append(f"No change beyond rounding in the {matrices} weight matrices{partly}", style="bold green")
        text.append(f": {angle_text}, {norm_text}, both within what rounding gives (ε = {eps:.3g}; for the norms "
                    f"about {percent(precision.get('norm_change_rounding_mean'))}).")
        return _append_context(text, s)
    scope = f"{matrices} weight matrices{partly}"
    _append_movement(text, s, scope, angle_text, norm_text, norm_round=norm_round, angle_round=angle_round)
    paper = s.get("paper_direction_to_norm_ratio")
    if paper is not None:
        text.append(
            f"\nThe paper's ratio, mean (1 − cos) {percent(dc)} / mean norm change: {_ratio(paper)} "
            "(1 − cos θ ≈ θ²/2 is second order in the angle, so it understates the turn).", style="dim",
        )
    spectral = _spectral_clauses(s)
    if spectral:
        text.append("\nOn average " + "; ".join(spectral) + ".")
    _append_rank_advice(text, s)
    return _append_context(text, s)


def _append_movement(
    text: Text, s: dict[str, Any], scope: str, angle_text: str, norm_text: str, *, norm_round: Any, angle_round: Any
) -> None:
    """The first sentence of a changed pair: which of sideways and radial movement is larger, and by how much.

    When one of the two is at the rounding level only the other is said to have changed, and no ratio is given
    (a ratio against rounding noise means nothing).
    """
    precision = s.get("precision") or {}
    eps = precision.get("rounding_angle_rad")
    ratio = s.get("angle_to_norm_ratio")
    if norm_round:
        text.append("Only directions changed", style="bold")
        text.append(f" over {scope}: {angle_text} sideways; the norms changed only at "
                    f"the rounding level ({norm_text}; rounding alone gives about "
                    f"{percent(precision.get('norm_change_rounding_mean'))}), so no ratio is given.")
    elif angle_round:
        text.append("Only norms changed", style="bold")
        text.append(f" over {scope}: {norm_text}; the directions changed only at the "
                    f"rounding level ({angle_text}, ε = {eps:.3g}).")
    else:
        if ratio >= 1:
            text.append(f"Rows moved {_ratio(ratio)} farther sideways (direction) than radially (norm)", style="bold")
        else:
            text.append(f"Rows moved {_ratio(1 / ratio)} farther radially (norm) than sideways (direction)", style="bold")
        text.append(f" over {scope}: ")
        text.append(f"{angle_text}", style="magenta")
        text.append(" against ")
        text.append(f"{norm_text} (std over a layer's rows {percent(s.get('norm_change_std'))})", style="cyan")
        text.append(".")


def _spectral_clauses(s: dict[str, Any]) -> list[str]:
    """The residual's low-rank share and the rotation's explained share, each beside its chance value.

    "low-rank"/"rotational" is said only when the summary marks the mean above chance; a number without its
    chance baseline is left out rather than printed alone.
    """
    spectral = []
    energy, energy_chance = s.get("residual_energy_at_30pct_rank_mean"), s.get("residual_energy_at_30pct_rank_chance_mean")
    if energy is not None and energy_chance is not None:
        verdict = ("low-rank beyond chance" if s.get("residual_energy_at_30pct_rank_above_chance")
                   else "at chance: no more low-rank than a structureless change")
        spectral.append(
            f"the direction residual keeps {percent(energy)} of its energy at 30 % rank (a structureless change of "
            f"the same shapes: {percent(energy_chance)}; {_points(energy - energy_chance)}, {verdict})"
        )
    explained, explained_chance = s.get("lorad_explained_mean"), s.get("lorad_explained_chance_mean")
    if explained is not None and explained_chance is not None:
        verdict = ("rotational beyond chance" if s.get("lorad_explained_above_chance")
                   else "at chance: a rotation fits it no better than a structureless change")
        spectral.append(
            f"a pairwise rotation explains {percent(explained)} of the direction change (structureless: "
            f"{percent(explained_chance)}; {_points(explained - explained_chance)}, {verdict})"
        )
    return spectral


def _append_rank_advice(text: Text, s: dict[str, Any]) -> None:
    """The median recommended LoRaD rank and its parameter count, or why no rank is recommended."""
    precision = s.get("precision") or {}
    if s.get("recommended_rank_median") is not None:
        text.append(
            f"\nRank advice: median LoRaD rank {_rank(s['recommended_rank_median'])} over the "
            f"{s.get('recommended_layers', 0)} matrices that changed beyond rounding "
            f"(≈{(s.get('recommended_params') or 0) / 1e6:.3g}M parameters)."
        )
    elif s.get("lorad_explained_mean") is not None or precision.get("rounding_level"):
        text.append("\nRank advice: no layer changed beyond rounding, so none is recommended.")


def _append_context(text: Text, s: dict[str, Any]) -> Text:
    """Precision, unmatched tensors and bad rows: what the headline's numbers leave out, by name."""
    precision = s.get("precision") or {}
    if precision.get("lowered"):
        compared = ", ".join(precision.get("compared_dtypes") or [])
        text.append(
            f"\nPrecision: the teacher is stored as {', '.join(precision.get('teacher_dtypes') or [])} and the student "
            f"as {', '.join(precision.get('student_dtypes') or [])}; {precision['lowered']} tensors were compared at "
            f"the lower precision ({compared}), so a plain cast reads as unchanged.", style="yellow",
        )
    if precision.get("rounding_level"):
        text.append(
            f"\n{precision['rounding_level']} matrices turned only at the rounding level (none of their rows turned "
            "further than rounding can turn a row): "
            f"{_names_text((precision.get('rounding_level_names') or [])[:3], precision['rounding_level'])}; "
            "they get no rank advice.", style="yellow",
        )
    if s.get("unmatched"):
        text.append(
            f"\n{s['unmatched']} tensors were not compared (no same-named, same-shaped partner): "
            f"{_names_text(s.get('unmatched_names') or [], s['unmatched'])}; the report's pairing section lists all.",
            style="yellow",
        )
    if s.get("nonfinite"):
        text.append(
            f"\n{s['nonfinite']} rows hold NaN/Inf and were left out, in "
            f"{_names_text(s.get('nonfinite_layers') or [], s.get('nonfinite_layer_count') or 0)}.", style="yellow",
        )
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


ROUNDING_MARK = "≤ε"


def _floor(report: Report) -> float:
    """ε of the precision the report compared at (0 when unknown): changes at or below it are rounding."""
    return float((report.summary.get("precision") or {}).get("rounding_angle_rad") or 0.0)


def _share_or_rounding(value: float | None, eps: float | None, *, second_order: bool = False) -> str:
    """A relative change as a percentage, or ``≤ε`` when it is no larger than rounding makes it (``eps``: for a
    norm change the layer's rounding scale 2ε/√fan-in; for 1 − cos, ε²/2), exact zeros aside."""
    eps = eps or 0.0
    limit = eps * eps / 2 if second_order else eps
    if value is not None and 0 < value <= limit:
        return ROUNDING_MARK
    return percent(value)


def _degrees_or_rounding(value: float | None, eps: float) -> str:
    if value is not None and 0 < value <= math.degrees(eps):
        return ROUNDING_MARK
    return degrees(value)


def _with_excess(value: float | None, excess: float | None) -> str:
    """``65.4 % (+3.1)``: a share and, in brackets, its excess over chance in percentage points."""
    if value is None:
        return "-"
    return percent(value) if excess is None else f"{percent(value)} ({excess * 100:+.2g})"


def top_rotated_table(report: Report, top: int = 10) -> Table:
    """The matrices that turned most (largest mean angle), with their spectra against chance.

    Layer names are long (``up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), so they sit in a
    second column that wraps while the numbers stay on one line each.
    """
    rows = [r for r in report.layers if len(r.get("shape") or ()) >= 2 and r.get("angle_deg_mean") is not None]
    rows.sort(key=lambda r: r["angle_deg_mean"], reverse=True)
    eps = _floor(report)
    table = compact_table(f"Most rotated layers (top {min(top, len(rows))} of {len(rows)} by mean angle)")
    cells = [
        (
            f"{r.get('module') or r['name']} {'×'.join(str(n) for n in r['shape'])}"
            + (" (rounding level)" if r.get("rounding_level") else ""),
            f"{_degrees_or_rounding(r.get('angle_deg_mean'), eps)}/{_degrees_or_rounding(r.get('angle_deg_max'), eps)}",
            _share_or_rounding(r.get("norm_change_mean"), r.get("norm_change_rounding")),
            _with_excess(r.get("residual_energy_at_30pct_rank"), r.get("residual_energy_at_30pct_rank_excess")),
            _with_excess(r.get("lorad_explained"), r.get("lorad_explained_excess")),
            _rank(r.get("recommended_rank")),
        )
        for r in rows[:top]
    ]
    headers = ("layer and shape", "angle mean/max", "norm chg", "E@30% (±ch.)", "rot. (±ch.)", "rank")
    for index, header in enumerate(headers):
        if index == 0:
            table.add_column(header, justify="left", overflow="fold", ratio=1, min_width=14)
        else:
            table.add_column(header, justify="right", no_wrap=True, min_width=_widest(header, cells, index))
    for row in cells:
        table.add_row(*row)
    return table


def _widest(header: str, cells: list[tuple[str, ...]], index: int) -> int:
    """Width of a no-wrap column's longest entry, so that rich's minimum width measures it whole."""
    return max([len(header), *(len(row[index]) for row in cells)])


def groups_tables(report: Report) -> list[RenderableType]:
    """Block × layer type in two tables that each fit 80 columns (changes; spectra against chance), and a legend."""
    groups = report.summary.get("groups", [])
    eps = _floor(report)
    changes = compact_table("By block and layer type: how far the weights moved (weight matrices; means of "
                            "per-layer means)")
    change_cells = [
        (g["block"], g["layer_type"], str(g["matrices"]), _count(g["params"]), str(g.get("identical", 0)),
         _degrees_or_rounding(g.get("angle_deg_mean"), eps),
         _share_or_rounding(g.get("norm_change_mean"), g.get("norm_change_rounding_mean")),
         _share_or_rounding(g.get("direction_change_mean"), eps, second_order=True))
        for g in groups
    ]
    spectra = compact_table("By block and layer type: structure of the direction change against chance")
    spectra_cells = [
        (g["block"], g["layer_type"],
         _with_excess(g.get("residual_energy_at_30pct_rank_mean"), g.get("residual_energy_at_30pct_rank_excess_mean")),
         _with_excess(g.get("lorad_explained_mean"), g.get("lorad_explained_excess_mean")),
         str(g.get("rounding_level", 0)), _rank(g.get("recommended_rank_median")))
        for g in groups
    ]
    for table, headers, cells in (
        (changes, ("block", "layer type", "mats", "params", "ident.", "angle", "norm chg", "1−cos"), change_cells),
        (spectra, ("block", "layer type", "E@30% (±ch.)", "rot. (±ch.)", "round.", "rank"), spectra_cells),
    ):
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index < 2 else "right", no_wrap=True,
                             min_width=_widest(header, cells, index))
        for row in cells:
            table.add_row(*row)
    legend = Text(
        "mats = weight matrices, ident. = bit-identical ones, angle = mean angle between teacher and student rows, "
        "norm chg = mean relative norm change, 1−cos = the paper's direction change; E@30% = share of the direction "
        "residual's energy kept at 30 % rank, rot. = share of the direction change a pairwise rotation explains, "
        "each with its excess over a structureless change of the same shapes in percentage points (±ch.); "
        "round. = matrices turned only at the rounding level (no rank advice); rank = median recommended LoRaD "
        f"rank; {ROUNDING_MARK} = no larger than rounding makes it (angles: ε = {eps:.3g} of the compared precision; "
        "norm changes: 2ε/√fan-in; 1 − cos: ε²/2)."
        if eps else
        "round. = matrices turned only at the rounding level (no rank advice); rank = median recommended LoRaD "
        "rank.", style="dim",
    )
    return [changes, spectra, legend]


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
        parts += [top_rotated_table(report, top), *groups_tables(report)]
    if not report.settings.get("spectra", True):
        parts.append(Text("Spectra were skipped (--no-spectra): ranks and explained fractions are empty.", style="dim"))
    return parts


def print_summary(report: Report, console: Console | None = None, *, top: int = 10) -> None:
    """Print the summary to ``console`` (stdout by default)."""
    print_renderables(summary_renderables(report, top=top), console)


def print_renderables(parts: list[RenderableType], console: Console | None = None) -> None:
    """Print rich renderables one after another with a blank line between (tables never lose a column)."""
    console = console or Console()
    for part in parts:
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
