"""One run per output folder: ``OUT/run.lock`` names the run that holds the folder (host, pid, start, command).

A second run into a folder whose holder is alive is refused with one sentence naming it. A lock whose holder is
gone (same host, the process no longer exists or its pid now belongs to a newer process) is stale: it is taken
over with a one-line note. A lock written on another host is never assumed stale, since that host's processes
cannot be seen from here; the refusal says to delete the file once that run is known to be gone (its node died).

The lock file is created with ``O_CREAT | O_EXCL``, which is atomic on local file systems and on the shared ones
clusters use (NFSv3 and later, Lustre, GPFS, BeeGFS). ``fcntl``/``flock`` locks are not used: on NFS they need a
lock daemon that is often missing, Lustre mounted with ``localflock`` keeps them per node, and either way they
say nothing about who holds the folder. The price of a plain file is that a killed holder leaves it behind,
hence the stale check.

In a multi-process launch (``accelerate launch``, ``torchrun``) only the main process locks; the others write
nothing that another run could mix up.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from wadi_probe.errors import WadiInputError

LOCK_NAME = "run.lock"
_READ_ATTEMPTS = 20  # a lock file is read again for up to ~1 s while its creator is still writing it


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder, as its ``run.lock`` records it."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str
    token: str  # tells this lock from a later one taken by a process with the same pid
    pid_started: int | None = None  # the process's start time in clock ticks since boot (Linux), against pid reuse

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started}"


def is_main_process() -> bool:
    """True in the process that locks and writes a run's folder: rank 0 of a launch, or a plain process.

    The same environment variables accelerate reads for the process index (torchrun and ``accelerate launch`` set
    ``RANK``; MPI launchers their own), so the answer agrees with ``Accelerator().is_main_process``.
    """
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, from ``/proc``), or None where that cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def read_holder(folder: str | Path) -> LockHolder | None:
    """The holder recorded in ``folder/run.lock``, or None when the folder is not locked.

    A file that stays unreadable (not written by this tool) is refused with one sentence saying how to clear it.
    """
    path = Path(folder) / LOCK_NAME
    for attempt in range(_READ_ATTEMPTS):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return LockHolder(**{k: data[k] for k in ("host", "pid", "started", "command", "token")},
                              pid_started=data.get("pid_started"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)  # its creator may be between creating and writing it
    raise WadiInputError(f"{path} is not a lock this tool wrote; if no run is using {Path(folder)}, delete it and "
                         "run again.")


def holder_is_gone(holder: LockHolder) -> bool:
    """True when ``holder`` ran on this host and its process has ended (or its pid was reused); False otherwise."""
    if holder.host != socket.gethostname():
        return False
    if not _process_exists(holder.pid):
        return True
    now = process_start_ticks(holder.pid)
    return holder.pid_started is not None and now is not None and now != holder.pid_started


class RunLock:
    """The lock of one run on its output folder: :meth:`acquire`, then :meth:`release` (or use ``with``).

    ``note`` receives the one-line note when a stale lock is taken over. ``created_folder`` says whether the
    folder was made by :meth:`acquire`; :meth:`release` then removes it again if nothing else was written to it.
    """

    def __init__(self, folder: str | Path, *, command: str | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command if command is not None else shlex.join(sys.argv)
        self.note = note
        self.holder: LockHolder | None = None
        self.created_folder = False

    @property
    def held(self) -> bool:
        return self.holder is not None

    def _create(self) -> bool:
        """Create the lock file with this process as holder; False when another lock exists."""
        holder = LockHolder(host=socket.gethostname(), pid=os.getpid(),
                            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            command=self.command, token=secrets.token_hex(8),
                            pid_started=process_start_ticks(os.getpid()))
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(holder), indent=1) + "\n")
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.holder = holder
        return True

    def _take_over(self, stale: LockHolder) -> bool:
        """Remove the stale lock ``stale``; False when another process changed the lock meanwhile.

        The lock is renamed away first (atomic), then checked to be the stale one: two runs taking over the same
        stale lock at once can then never delete each other's fresh lock.
        """
        aside = self.folder / f".{LOCK_NAME}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            data = json.loads(aside.read_text(encoding="utf-8"))
            ours = data.get("token") == stale.token
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:  # a live lock taken meanwhile: put it back unless yet another one exists already
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)
        return ours

    def acquire(self) -> "RunLock":
        """Lock the folder (creating it if needed), or refuse with one sentence naming the live holder."""
        if self.held:
            return self
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created_folder = True
        for _ in range(5):
            if self._create():
                return self
            holder = read_holder(self.folder)
            if holder is None:  # released between the two looks: try again
                continue
            if not holder_is_gone(holder):
                hint = "" if holder.host == socket.gethostname() else (
                    f"; if that run is gone (its node failed), delete {self.path} and run again")
                raise WadiInputError(f"{self.folder} is in use by another run ({holder.describe()}){hint}; wait for "
                                     "it to finish or choose another output folder.")
            if self._take_over(holder) and self.note is not None:
                self.note(f"took over the stale lock of {self.folder} (pid {holder.pid} on {holder.host}, running "
                          f"since {holder.started}, has ended)")
        raise WadiInputError(f"{self.path} keeps changing: several runs are starting in {self.folder} at once; "
                             "start one.")

    def release(self) -> None:
        """Remove the lock if it is still this run's (idempotent); remove a folder :meth:`acquire` made and nothing
        else filled."""
        if self.holder is None:
            return
        try:
            current = read_holder(self.folder)
        except WadiInputError:
            current = None
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None
        if self.created_folder:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(folder: str | Path, *, note: Callable[[str], None] | None = None) -> RunLock:
    """Lock ``folder`` for a run in the main process; in the other processes of a launch, an unheld lock.

    Release it with :meth:`RunLock.release` on every exit path (the trainer does, and ``with`` does).
    """
    lock = RunLock(folder, note=note)
    return lock.acquire() if is_main_process() else lock
