"""``wadi-distill plan``: which layers get a LoRaD adapter at which rank (preset or from a probe report)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from wadi_distill.cli import app
from wadi_probe.choices import Choice
from wadi_probe.console import choice_option, console, handle_errors
from wadi_probe.errors import WadiInputError

if TYPE_CHECKING:  # pragma: no cover
    from wadi_distill.plan import Plan


class Preset(Choice):
    """The uniform plans (:data:`wadi_distill.plan.presets.PRESETS`; a test keeps the two lists equal)."""

    paper = "paper"
    paper_conv = "paper-conv"
    all_linear = "all-linear"


def _reason_group(reason: str) -> str:
    return reason.split(" (")[0]


def make_plan(
    teacher: str | Path,
    *,
    preset: str | Preset | None,
    rank: int | None,
    report: Path | None,
    budget: float,
    threshold: float,
    min_rank: int,
    max_rank: int | None,
    multiple_of: int,
    include_conv: bool,
) -> "Plan":
    """Build the plan the command's options describe (a diffusers teacher's config is enough: meta device)."""
    from wadi_distill.plan import load_planning_model, plan_from_preset, plan_from_report

    if (preset is None) == (report is None):
        raise WadiInputError("give exactly one of --preset (with --rank) or --rank-from-probe REPORT.")
    model = load_planning_model(teacher)
    if preset is not None:
        if rank is None:
            raise WadiInputError("--preset needs --rank N (the paper uses 256 for SD UNets, 128 for PixArt).")
        return plan_from_preset(model, rank, preset.value if isinstance(preset, Preset) else preset)
    return plan_from_report(model, report, budget=budget, threshold=threshold, min_rank=min_rank, max_rank=max_rank,
                            multiple_of=multiple_of, include_conv=include_conv)


@app.command("plan")
@handle_errors
def plan_command(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model folder or pipeline folder (config.json is enough), or builtin:digits."),
    preset: Optional[Preset] = choice_option(Preset, None, "--preset", what="preset", help="Uniform plan: one rank on every chosen layer."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank for --preset."),
    rank_from_probe: Optional[Path] = typer.Option(None, "--rank-from-probe", help="Choose layers and ranks from a wadi-probe report.json."),
    budget: float = typer.Option(0.10, "--budget", help="Trainable parameters as a fraction of the backbone (with --rank-from-probe)."),
    threshold: float = typer.Option(0.9, "--threshold", help="Angle-field energy each layer's rank should capture."),
    min_rank: int = typer.Option(8, "--min-rank", help="Smallest rank given to an adapted layer."),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="Largest rank given to any layer."),
    multiple_of: int = typer.Option(8, "--multiple-of", help="Round ranks to a multiple of this."),
    include_conv: bool = typer.Option(False, "--include-conv", help="Also plan Conv2d layers (beyond the paper)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the plan (JSON) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Plan LoRaD layers and ranks for a teacher: the paper's preset or ranks chosen from a probe report."""
    from wadi_probe.io.outputs import check_outputs

    check_outputs({"plan": output}, [teacher, rank_from_probe])
    plan = make_plan(teacher, preset=preset, rank=rank, report=rank_from_probe, budget=budget, threshold=threshold,
                     min_rank=min_rank, max_rank=max_rank, multiple_of=multiple_of, include_conv=include_conv)
    if output is not None:
        plan.save(output)
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=1))
        return
    console.print(plan.to_table())
    for note in plan.notes:
        console.print(f"• {note}", highlight=False)
    if plan.skipped:
        groups = Counter(_reason_group(reason) for _, reason in plan.skipped)
        console.print("left out: " + "; ".join(f"{n} × {reason}" for reason, n in groups.most_common()), highlight=False)
    if output is not None:
        console.print(f"plan written to {output}", highlight=False)
