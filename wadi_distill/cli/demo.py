"""``wadi-distill demo``: the end-to-end demo on ``builtin:digits`` (distil → probe → LoRaD from the probe → evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from wadi_distill.cli import app
from wadi_probe.console import console, handle_errors


def results_table(rows: list[dict]) -> Table:
    """The demo's final table, narrow enough for 80 columns: header words and model names wrap at spaces and are
    never cut off (a word longer than its column folds onto the next line instead of ending in "…")."""
    from wadi_distill.digits_demo.demo import METRIC_KEYS, METRIC_TITLES, metric_noise
    from wadi_probe.report.summary import compact_table

    table = compact_table("one-step students vs the teacher (held-out reference digits)")
    def narrow(header: str) -> int:  # a column as wide as its longest header word or a number (0.957, 99.99)
        return max(6, *(len(word) for word in header.split()))

    table.add_column("model", overflow="fold", min_width=20)
    table.add_column("steps/ image", justify="right", overflow="fold", max_width=narrow("steps/ image"))
    for key in METRIC_KEYS:
        table.add_column(METRIC_TITLES[key], justify="right", overflow="fold", max_width=narrow(METRIC_TITLES[key]))
    for row in rows:
        cells = []
        for key in METRIC_KEYS:
            value = f"{row[key]:.2f}" if key.startswith("fd_") else f"{row[key]:.3f}"
            noise = metric_noise(row, key)
            cells.append(value if noise is None else f"{value}\n±{noise}")
        table.add_row(row["name"], str(row["steps_per_image"]), *cells)
    return table


def noise_footnote(rows: list[dict]) -> str | None:
    """The sentence under the table saying what ± is, from the rows' own set counts and sizes."""
    noisy = [r for r in rows if r.get("noise_sets", 1) > 1]
    if not noisy:
        return None
    sizes = sorted({(r["noise_sets"], r["num_images"]) for r in noisy})
    if len(sizes) == 1:
        sets = f"{sizes[0][0]} noise sets of {sizes[0][1]} images"
    else:  # the multi-step teacher and the one-step models are scored on sets of different sizes: say which
        def group(k: int, n: int) -> str:
            steps = {r.get("steps_per_image", 1) for r in noisy if (r["noise_sets"], r["num_images"]) == (k, n)}
            who = "the one-step models" if steps == {1} else "the multi-step teacher" if 1 not in steps else "the rest"
            return f"{k} noise sets of {n} images for {who}"
        sets = " and ".join(group(k, n) for k, n in sizes)
    fixed = [r["name"] for r in rows if r.get("noise_sets", 1) == 1]
    means = " and ".join(sorted({f"± / √{k}" for k, _ in sizes}))
    return (f"each score is the mean over {sets}; ± is the evaluation noise, the sd over the sets (the mean moves "
            f"about {means})" + (f"; {'; '.join(fixed)}: one fixed set, no ±." if fixed else "."))


@app.command("demo")
@handle_errors
def demo_command(
    output_dir: Path = typer.Option(Path("reports/demo"), "--output-dir", "-o", help="Folder for the report, metrics, grids and students."),
    quick: bool = typer.Option(False, "--quick", help="A smoke run of a minute or two (few steps, fewer images)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training runs and of the evaluation noise."),
    full_steps: Optional[int] = typer.Option(None, "--full-steps", help="VSD steps of the fully fine-tuned student."),
    lorad_steps: Optional[int] = typer.Option(None, "--lorad-steps", help="VSD steps of the LoRaD student."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Prompts per VSD step (both students unless --lorad-batch-size is given)."),
    lorad_batch_size: Optional[int] = typer.Option(
        None, "--lorad-batch-size", help="Prompts per VSD step of the LoRaD student."),
    full_fake_updates: Optional[int] = typer.Option(
        None, "--full-fake-updates", help="Fake-score updates per step of the fully fine-tuned student."),
    lorad_fake_updates: Optional[int] = typer.Option(
        None, "--lorad-fake-updates", help="Fake-score updates per step of the LoRaD student."),
    processes: Optional[int] = typer.Option(
        None, "--processes",
        help="2 (default): score the teacher in a second process while the students train; 1: all in this one."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Distil builtin:digits with full fine-tuning, probe it, distil LoRaD from the probe, and score everything."""
    from wadi_distill.digits_demo.demo import run_demo
    from wadi_distill.vsd.preemption import RunStopped
    from wadi_probe.console import err_console

    try:
        result = run_demo(output_dir, full_steps=full_steps, lorad_steps=lorad_steps, batch_size=batch_size,
                          lorad_batch_size=lorad_batch_size, full_fake_updates=full_fake_updates,
                          lorad_fake_updates=lorad_fake_updates, seed=seed, processes=processes, quick=quick,
                          progress=progress, console=console)
    except RunStopped as stopped:  # the demo keeps no checkpoints: it starts over when run again
        err_console.print(f"{stopped.signal_name} received: the demo stopped and removed its training runs; run it "
                          f"again to start over (exit code {stopped.exit_code}).", highlight=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None
    console.print(results_table(result.rows))
    footnote = noise_footnote(result.rows)
    if footnote:
        console.print(footnote, highlight=False)
    console.print(f"wrote {result.metrics_md}, {result.metrics_json}, {result.report_path}, "
                  f"{len(result.grids)} sample grids and {len(result.plots)} plots into {result.output_dir} "
                  f"in {result.wall_seconds:.0f} s", highlight=False)
