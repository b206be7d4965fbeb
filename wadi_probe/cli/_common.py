"""What every command of both CLIs shares: turning input errors into one sentence and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from wadi_probe.errors import WadiInputError, WadiRuntimeError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_RUNTIME = 1


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Decorate a command so project errors become one sentence and a non-zero exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WadiInputError as exc:
            fail(str(exc), EXIT_USAGE)
        except WadiRuntimeError as exc:
            fail(str(exc), EXIT_RUNTIME)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
