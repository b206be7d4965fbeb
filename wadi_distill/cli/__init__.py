"""``wadi-distill``: plan, train, export and sample one-step students with LoRaD adapters.

Each command lives in its own module and registers itself on :data:`app`; this package only assembles them.
Command modules import their heavy dependencies (torch, diffusers) inside the command function, so ``--help``
and ``--version`` answer without loading them.
"""

from __future__ import annotations

import typer

from wadi_distill import __version__
from wadi_probe.console import version_option

app = typer.Typer(
    name="wadi-distill",
    help="Distil a multi-step diffusion teacher into a one-step student with LoRaD (low-rank rotation of weight direction).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: it wraps at any width, where rich's option table truncates long option names at 80
    # columns (a piped log, a narrow terminal)
    rich_markup_mode=None,
)

@app.callback()
def _group(version: bool = version_option("wadi-distill", __version__)) -> None:
    """Keep the app a command group; ``--version`` prints the version."""


# Command modules (each registers with ``@app.command``).
from wadi_distill.cli import _commands_registry  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()
