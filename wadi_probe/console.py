"""What every command of both command lines shares: the consoles, one-sentence errors, the ``--device`` choice.

This is a public module: ``wadi_distill``'s commands use it as ``wadi_probe``'s do. It imports only typer and
rich, so a command module can use it at import time without slowing ``--help`` down.

- :func:`handle_errors` turns :class:`~wadi_probe.errors.WadiInputError` into one sentence on stderr and exit
  code 2 (:class:`~wadi_probe.errors.WadiRuntimeError`: exit code 1), never a traceback; so is an ``OSError``
  that says the place refused a write (no space, a file-size limit, read-only, no permission);
- :class:`Device` is the ``--device`` choice (``auto`` picks CUDA when there is one), :func:`device_option`
  the option itself and :func:`choice_option` any other choice option made from an :class:`enum.Enum` (a bad
  value is one sentence and exit code 2, like every other input error);
- :func:`version_option` adds ``--version`` to an app;
- :func:`progress_bar` is the one progress display of long work (rich, on stderr), library loops included;
- :func:`print_line` and :func:`stdout_may_close` keep a command going when its stdout's reader has gone
  (``wadi-distill run ... | head -1``): stdout is pointed at ``/dev/null`` and what would be printed is dropped.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from wadi_probe.choices import Choice
from wadi_probe.errors import WadiInputError, WadiRuntimeError
from wadi_probe.text import quoted

__all__ = ["console", "err_console", "EXIT_USAGE", "EXIT_RUNTIME", "fail", "handle_errors", "Device", "choice_option",
           "device_option", "version_option", "progress_bar", "print_line", "stdout_may_close"]

E = TypeVar("E", bound=enum.Enum)

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_RUNTIME = 1


class Device(Choice):
    """Where to compute: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
        except OSError as exc:  # a write outside atomic_path (a log, a folder) that the place refused: no space, ...
            from wadi_probe.errors import WRITE_ERRORS

            if exc.errno not in WRITE_ERRORS:
                raise
            fail(f"{exc.filename or 'a file'}: {WRITE_ERRORS[exc.errno]}.", EXIT_USAGE)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def choice_option(choices: type[E], default: E | None, *names: str, what: str, help: str) -> Any:
    """A typer option whose value is a member of the enum ``choices`` (given on the command line by its value).

    The help shows ``[a|b|c]``; anything else stops the command with "unknown <what> 'x'; use a, b or c." on
    stderr and exit code 2.
    """
    if not issubclass(choices, Choice):
        # a plain str enum reaches the command as None under typer < 0.29 (see wadi_probe.choices)
        raise TypeError(f"{choices.__name__} must subclass wadi_probe.choices.Choice to be a command-line choice")
    values = [member.value for member in choices]

    def parse(text: Any) -> E:
        if isinstance(text, choices):
            return text
        try:
            return choices(str(text))
        except ValueError:
            listed = ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
            fail(f"unknown {what} {quoted(str(text))}; use {listed}.")
            raise  # pragma: no cover  (fail exits)

    shown = f"{help} Default: {default.value}." if default is not None else help
    return typer.Option(default.value if default is not None else None, *names, parser=parse,
                        metavar="[" + "|".join(values) + "]", help=shown)


def device_option(default: Device = Device.auto, help: str = "Where to compute; auto picks CUDA when available.") -> Any:
    """The ``--device`` option of every command that computes."""
    return choice_option(Device, default, "--device", what="device", help=help)


def progress_bar(title: str, *fields: str, percent: bool = False, transient: bool = False) -> Any:
    """A rich ``Progress`` on stderr: title, bar, done/total (or a percentage), elapsed, remaining, then ``fields``.

    Each name in ``fields`` is a ``task.fields`` entry shown after the times (e.g. the current layer or loss);
    use it as a context manager or with ``start()``/``stop()``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    count = TextColumn("{task.percentage:>3.0f}%") if percent else MofNCompleteColumn()
    columns = [TextColumn(f"[bold]{title}[/]"), BarColumn(), count, TimeElapsedColumn(), TimeRemainingColumn(),
               *(TextColumn(f"[dim]{{task.fields[{name}]}}[/]") for name in fields)]
    return Progress(*columns, console=err_console, transient=transient)


def version_option(name: str, version: str) -> Any:
    """A ``--version`` option for an app callback: prints ``name version`` and exits 0."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{name} {version}")
            raise typer.Exit(0)

    return typer.Option(False, "--version", help="Show the version and exit.", is_eager=True, callback=show)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone, and later writes (the interpreter's last flush included)
    must neither fail nor print "Exception ignored" on stderr."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout (a captured stream)
        sys.stdout = open(os.devnull, "w")
    finally:
        os.close(devnull)


@contextlib.contextmanager
def stdout_may_close() -> Any:
    """Inside, a write to a stdout whose reader has gone (``| head -1``) is dropped instead of ending the command."""
    try:
        yield
    except BrokenPipeError:
        _drop_stdout()


def print_line(text: str) -> None:
    """Print ``text`` as one flushed line on stdout (a batch job's log follows at once); dropped, never fatal, when
    stdout's reader has gone."""
    with stdout_may_close():
        print(text, flush=True)
