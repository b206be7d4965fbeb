"""``wadi-distill``: plan, train, export and sample one-step students with LoRaD adapters.

Each command lives in its own module and registers itself on :data:`app`; this package only assembles them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="wadi-distill",
    help="Distil a multi-step diffusion teacher into a one-step student with LoRaD (low-rank rotation of weight direction).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def _group() -> None:
    """Keep the app a command group even while it has a single command."""


# Command modules (each registers with ``@app.command``).
from wadi_distill.cli import _commands_registry  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()
