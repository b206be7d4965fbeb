"""What a VSD run reports while it runs: the loss log on disk, TensorBoard, and the console (bar or plain lines).

Only rank 0 reports. On a terminal the console shows a rich bar with the step, the losses, seconds per step and
the time left; when stdout is not a terminal (SLURM, nohup, a pipe) it prints a plain line every ``every`` steps
(``step 20/1000  loss_student 1.2e-05  loss_fake 0.0026  0.84 s/step  ETA 0:13:43``) and one line per event
(prompt encoding, checkpoint, validation), flushed at once so a batch job's log follows the run. When stdout's
reader goes away (``run ... | head -1``) the lines are dropped and the run goes on to write all its outputs.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

from wadi_probe.console import print_line
from wadi_probe.io.atomic import atomic_path


class RunLog:
    """JSONL loss log (``logs/losses.jsonl``) plus TensorBoard scalars/images."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.log_path = output_dir / "logs" / "losses.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():  # drop lines a killed run wrote after its last checkpoint
            kept = [line for line in self.log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "logs" / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard missing or broken: the JSONL log still records everything
                self.writer = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def images(self, step: int, tag: str, grid_path: Path) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        array = np.asarray(Image.open(grid_path).convert("RGB"))
        self.writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of a (non-negative) number of seconds."""
    return str(timedelta(seconds=int(round(max(0.0, seconds)))))


def progress_line(step: int, total: int, values: dict[str, float], seconds_per_step: float) -> str:
    """One plain log line: step, both losses, seconds per step, time left at that pace."""
    eta = format_duration(seconds_per_step * (total - step))
    return (f"step {step}/{total}  loss_student {values['loss_student']:.4g}  loss_fake {values['loss_fake']:.4g}"
            f"  {seconds_per_step:.3g} s/step  ETA {eta}")


class Console:
    """The console side of a run: a rich bar (``bar=True``), plain lines, or nothing (``enabled=False``)."""

    def __init__(self, total: int, *, bar: bool | None, every: int = 10, enabled: bool = True) -> None:
        self.total, self.every, self.enabled = total, max(1, int(every)), enabled
        self.bar = sys.stdout.isatty() if bar is None else bool(bar)
        self._start_step, self._started = 0, time.perf_counter()
        self._progress = None

    def start(self, start: int) -> None:
        """Begin the training display at step ``start`` (a resumed run starts past 0)."""
        self._start_step, self._started = start, time.perf_counter()
        if self.enabled and self.bar:
            from wadi_probe.console import progress_bar

            self._progress = progress_bar("VSD", "pace", "losses")
            self._task = self._progress.add_task("train", total=self.total, completed=start, losses="", pace="")
            self._progress.start()

    def seconds_per_step(self, step: int) -> float:
        """Mean wall time per step since this process started training (resume included)."""
        done = step - self._start_step
        return (time.perf_counter() - self._started) / done if done > 0 else 0.0

    def step(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        pace = self.seconds_per_step(step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, pace=f"{pace:.3g} s/step", losses=(
                f"student {values['loss_student']:.4g}  fake {values['loss_fake']:.4g}"))
        elif step % self.every == 0 or step == self.total:
            print_line(progress_line(step, self.total, values, pace))

    def note(self, text: str) -> None:
        """An event line (prompt encoding, checkpoint, validation)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            print_line(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
