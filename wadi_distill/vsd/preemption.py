"""Stop a run cleanly on a scheduler's signal: finish the step, write a checkpoint, exit with a requeue code.

Schedulers warn before they stop a job: SLURM sends a signal chosen with ``--signal`` (``USR1@90``: SIGUSR1 90 s
before the time limit) and SIGTERM on preemption or ``scancel``, Kubernetes sends SIGTERM and waits
``terminationGracePeriodSeconds``. While the training loop runs, :class:`StopSignals` turns each of these signals
(and Ctrl-C) into a request: the handler only sets a flag, and the loop asks :meth:`StopSignals.requested`
between steps, so a step is never cut in half. The trainer then writes a checkpoint of the step just finished and
raises :class:`RunStopped`, whose ``exit_code`` the command line exits with:

- ``75`` (``EX_TEMPFAIL`` of sysexits.h, "try again later") after a scheduler's signal: the checkpoint is on disk
  and ``--resume latest`` continues the run bit for bit. Batch scripts requeue on it (``scontrol requeue``);
  Kubernetes' ``podFailurePolicy`` can match it (``onExitCodes``). It differs from 0 (finished), 1 (failed),
  2 (refused input) and 128 + N (killed by signal N before anything was saved).
- ``130`` after Ctrl-C, the code shells give an interrupted command (a loop of runs stops), also with the
  checkpoint written. A second Ctrl-C stops at once, without a checkpoint.

Before the loop starts (loading the teacher, encoding prompts: minutes for a large model, longer than a grace
period) there is no step to finish and nothing to save: the handler raises :class:`RunStopped` at once (Ctrl-C:
``KeyboardInterrupt``), so the run unwinds, its folder lock is released and the requeued job can start anywhere.

In a multi-process launch each process may receive the signal at a slightly different moment; the processes agree
on the request with one all-reduce per step, so all stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterable

from wadi_probe.errors import WadiInputError

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def parse_signals(names: Iterable[str]) -> list[signal.Signals]:
    """Signals from names such as ``SIGTERM``, ``TERM`` or ``usr1``; one sentence for a name that cannot be caught."""
    found: list[signal.Signals] = []
    for name in names:
        text = str(name).strip().upper()
        full = text if text.startswith("SIG") else f"SIG{text}"
        member = getattr(signal.Signals, full, None) if full.isidentifier() else None
        if member is None or full in _UNCATCHABLE or full == "SIGINT":
            allowed = "any other signal name such as SIGTERM, SIGUSR1 or SIGUSR2"
            why = ("cannot be caught" if full in _UNCATCHABLE else "is always handled (Ctrl-C)" if full == "SIGINT"
                   else "is not a signal of this system")
            raise WadiInputError(f"--checkpoint-signal {name} {why}; use {allowed}.")
        if member not in found:
            found.append(member)
    return found


class RunStopped(BaseException):
    """A run stopped on a signal: after ``step`` with ``checkpoint`` written (None in processes that wrote none),
    or before training started (``step`` None, nothing to save).

    A ``BaseException`` like ``KeyboardInterrupt``: raised from a handler during set-up, it may surface inside a
    library call, and no ``except Exception`` there (diffusers wraps import errors, for one) may swallow it.
    """

    def __init__(self, signal_name: str, step: int | None, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_REQUEUE
        super().__init__(self.message())

    def message(self) -> str:
        if self.step is None:
            return (f"{self.signal_name} received before training started: nothing to save; start again with "
                    f"--resume latest (exit code {self.exit_code}).")
        where = f"checkpoint {self.checkpoint}" if self.checkpoint is not None else "its checkpoint"
        return (f"{self.signal_name} received: stopped after step {self.step} with {where}; continue with "
                f"--resume latest (exit code {self.exit_code}).")


class StopSignals:
    """Catch ``signals`` (and SIGINT) while installed; :meth:`requested` says whether one arrived.

    :meth:`install` when the run starts (set-up: a signal raises at once), :meth:`arm` when the loop starts (a
    signal only sets the flag), :meth:`restore` when it ends; or use it as a context manager around an armed loop.
    Handlers can only be set in the main thread; elsewhere (a loop started from a worker thread) nothing is
    installed and the signals keep their previous handling.
    """

    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS) -> None:
        self.signals = [*parse_signals(signals), signal.SIGINT]
        self.received: signal.Signals | None = None
        self.armed = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed:  # set-up: no step to finish
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise RunStopped(signal.Signals(signum).name, None, None)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.received is None or signum == signal.SIGINT:
            self.received = signal.Signals(signum)

    def arm(self) -> "StopSignals":
        """From now on a signal only sets the flag (the loop is running); installs the handlers if needed."""
        self.armed = True
        return self.install()

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (a signal arriving later is handled as before)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self.arm()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def requested(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """True once a signal arrived; ``agree`` combines the answers of all processes (any one asks: all stop)."""
        local = self.received is not None
        return agree(local) if agree is not None else local

    def stopped(self, step: int, checkpoint: Path | None) -> RunStopped:
        """The exception that ends the run after the checkpoint of ``step`` was written."""
        name = self.received.name if self.received is not None else "another process's stop signal"
        return RunStopped(name, step, checkpoint)


def any_process(world: int, device: Any) -> Callable[[bool], bool]:
    """An ``agree`` for :meth:`StopSignals.requested`: True on every process when any of the ``world`` says True.

    With one process it is the identity; with more, one all-reduce (MAX) of one number on ``device``.
    """
    if world <= 1:
        return lambda local: local

    def agree(local: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    return agree
