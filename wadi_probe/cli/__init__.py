"""``wadi-probe``: compare a teacher and a student checkpoint layer by layer.

Each command lives in its own module and registers itself on :data:`app`; this package only assembles them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="wadi-probe",
    help="Measure how a one-step student's weights moved away from its teacher: norm versus direction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def _group() -> None:
    """Keep the app a command group even while it has a single command."""


# Command modules (each registers with ``@app.command``).
from wadi_probe.cli import _commands_registry  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()
