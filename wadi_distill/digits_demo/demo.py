"""The end-to-end demo on ``builtin:digits``: distil, probe, distil again from the probe, evaluate.

1. VSD with full fine-tuning turns the multi-step digits teacher into a one-step student (as DMD2 / SwiftBrush
   train their students: every weight trainable).
2. :func:`wadi_probe.compare` measures how that student's weights moved away from the teacher's (norm versus
   direction, spectra, LoRaD rank advice) → ``report.json``, a printed summary and the report's plots.
3. VSD again, now with a LoRaD student whose layers and ranks :func:`wadi_distill.plan.plan_from_report` chose from
   that report (``rank_from_probe``).
4. The teacher (multi-step DDIM with CFG, and one step), both students (one step) and held-out real digits are
   scored with :mod:`wadi_distill.evaluate` against the held-out ``reference`` split → ``metrics.json``,
   ``metrics.md`` and one sample grid per model. The teacher's rows need no student, so by default a second
   process scores them (and then the fully fine-tuned student) while this one trains.

Everything lands in ``output_dir``; the trained students are kept there too (``full_student.safetensors``,
``lorad_student/``) so that the probe and the samples can be reproduced from the files.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wadi_distill.lorad.config import LoRaDConfig
from wadi_probe.text import plural
from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.io.outputs import check_outputs
from wadi_probe.errors import WadiInputError

#: The demo's and the study's evaluation (reports/digits_eval_noise.md): each one-step model on 5 noise sets of 5000
#: images (500 per digit). Per set the feature FD moved by an sd of 0.7-2.0 points (1000 images: 1.7-4.0; 300:
#: 1.0-6.9), so the mean of the 5 sets moves by 0.3-0.9; one set costs about 6 s of one CPU core. The multi-step
#: teacher (50 UNet calls an image) is scored on 5 sets of 1000 (per set sd 1.03 at 1000, 2.49 at 300).
EVAL_NOISE_SETS = 5
EVAL_PER_CLASS = 500
EVAL_MULTISTEP_PER_CLASS = 100
METRIC_KEYS = ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy")
METRIC_TITLES = {
    "fd_pixel": "FD pixel ↓",
    "fd_features": "FD features ↓",
    "precision": "precision ↑",
    "recall": "recall ↑",
    "class_accuracy": "class accuracy ↑",
}


@dataclass
class DemoSettings:
    """Step counts and sizes of one demo run. :data:`FULL_SETTINGS` is the README's run, :data:`QUICK_SETTINGS`
    a smoke run of a minute or two."""

    # VSD steps of the fully fine-tuned student: it is the probe's source (its 5 fake-score updates per step make
    # each step ≈ 3× a LoRaD step: 1.3 s on one core of the 2-core AMD EPYC VM), the LoRaD student the headline
    full_steps: int = 400
    lorad_steps: int = 500  # VSD steps of the LoRaD student (from the probe)
    batch_size: int = 16  # prompts per VSD step of the fully fine-tuned student
    # Prompts per VSD step of the LoRaD student. On the demo's recipe (reports/digits_demo_levers.md, seed 0, 800
    # steps, six sets of 2000 images) batch 64 brought the averaged student to feature FD 21.0 against batch 16's
    # 25.4, pixel FD 2.86 against 3.38 and recall 0.36 against 0.25, at 2.3× the time per step: 500 steps of
    # batch 64 cost about what 1200 of batch 16 do, and their curve had passed batch 16's 800-step score by step 200.
    lorad_batch_size: int = 64
    full_lr: float = 2e-5  # student learning rate of full fine-tuning (every weight moves: keep it small)
    # Fake-score updates per student step in full fine-tuning (DMD2's two time-scale rule). On the validation seed
    # of benchmarks/digits_study.py (800 steps) the fully fine-tuned student reached feature FD 191 with 1 and 39
    # with 5. The LoRaD student keeps 1 here, a third of the time; with 5 its recall was 0.55 against 0.28
    # (reports/digits_quality.md, sweep), and with 1 its feature FD swings with training length
    # (reports/digits_length.md): the seed spread of both recipes is in reports/digits_quality.md.
    full_fake_updates: int = 5
    lorad_lr: float = 1e-3  # student learning rate of the LoRaD student (angles start at 0)
    lorad_fake_updates: int = 1  # fake-score updates per student step of the LoRaD student
    fake_lr: float = 1e-2
    fake_rank: int = 32
    # CFG inside VSD: the real score at the multi-step teacher's scale, the fake score unguided (--cfg 2
    # --fake-cfg 1, DMD2's way), so the students aim at the distribution the 25-step teacher row samples. With the
    # paper's same scale on both (fake CFG = vsd_cfg) the LoRaD student's averaged weights scored feature FD 55.9
    # at 1200 steps against 24.1 (pixel FD 2.39 vs 3.24, recall 0.42 vs 0.28, precision 0.90 vs 0.98):
    # reports/digits_levers.md.
    vsd_cfg: float = 2.0
    vsd_fake_cfg: float | None = 1.0  # the fake score's own CFG scale (wadi-distill run --fake-cfg); None: vsd_cfg
    budget: float = 0.10  # trainable fraction of the backbone for the probe's plan
    threshold: float = 0.9  # angle-field energy each planned layer should reach
    ddim_steps: int = 25  # the teacher's multi-step sampler
    teacher_cfg: float = 2.0  # CFG scale of the teacher's multi-step samples
    # The metrics: each one-step model on eval_noise_sets noise sets of 10·eval_per_class images, the multi-step
    # teacher on as many sets of 10·multistep_per_class (it costs 2·ddim_steps UNet calls an image); each score is
    # the mean over the sets, its evaluation noise the sd over them (reports/digits_eval_noise.md).
    eval_per_class: int = EVAL_PER_CLASS
    eval_noise_sets: int = EVAL_NOISE_SETS
    multistep_per_class: int = EVAL_MULTISTEP_PER_CLASS
    grid_per_class: int = 10  # images per class in each sample grid
    threads: int | None = 1  # torch CPU threads while the demo runs (None: torch's default). The model is tiny:
    # one thread per process is fastest, and on shared or busy cores two threads were measured 10× slower.
    # Processes: 2 scores the teacher's rows (its 25-step DDIM sets are most of the evaluation) and then the fully
    # fine-tuned student in a second process while this one trains; the scores are the same as with 1, which runs
    # everything here, one stage after the other.
    processes: int = 2


FULL_SETTINGS = DemoSettings()
QUICK_SETTINGS = DemoSettings(full_steps=20, lorad_steps=20, batch_size=8, lorad_batch_size=8, ddim_steps=10,
                              eval_per_class=10, eval_noise_sets=2, multistep_per_class=10, full_fake_updates=2)


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and measured."""

    output_dir: Path
    rows: list[dict[str, Any]]  # one per evaluated model: name, metrics, steps per image, seconds
    summary: dict[str, Any]  # the probe report's summary
    report_path: Path
    metrics_json: Path
    metrics_md: Path
    grids: dict[str, Path]
    plots: list[Path]
    full_student_path: Path
    lorad_adapter_dir: Path
    plan: dict[str, Any]
    timings: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def row(self, key: str) -> dict[str, Any]:
        """The metrics row of one model key (``real``, ``teacher_multistep``, ``teacher_one_step``,
        ``full_student``, ``lorad_student``)."""
        for row in self.rows:
            if row["key"] == key:
                return row
        raise KeyError(key)


# ------------------------------------------------------------------------------------------------ pieces


def eval_labels(per_class: int) -> torch.Tensor:
    """Class labels of the evaluation set: ``per_class`` of each digit, class-major (0,0,…,1,1,…)."""
    if per_class < 1:
        raise WadiInputError("The evaluation needs at least one image per class.")
    return torch.arange(10).repeat_interleave(per_class)


def eval_seeds(count: int, seed: int, offset: int = 0) -> list[int]:
    """Noise seeds of the one-step samples: the same for every model, so the grids compare like with like.

    ``offset`` shifts them for further noise sets (set j of N images: ``offset = j·N``)."""
    return [seed * 1_000_003 + offset + i for i in range(count)]


@torch.no_grad()
def one_step_digits(teacher: Any, unet: torch.nn.Module, labels: torch.Tensor, seed: int,
                    device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """One-step digit images (N, 1, 8, 8) in [-1, 1] of ``unet`` (a student, or the teacher itself) for ``labels``.

    ``teacher`` is the :class:`wadi_distill.teachers.pipeline.Teacher` of ``builtin:digits`` (schedule, calling convention,
    prompt encoder); the noise comes from :func:`eval_seeds`.
    """
    from wadi_distill.one_step import one_step_images

    builtin = teacher.builtin
    cond = teacher.encode_prompts(builtin.prompts_for_labels(labels.tolist()))
    images = one_step_images(teacher, unet, cond, eval_seeds(len(labels), seed, offset), device=device)
    return images * 2.0 - 1.0


def score_multistep_digits(bundle: Any, labels: torch.Tensor, *, noise_sets: int = EVAL_NOISE_SETS, seed: int = 0,
                           steps: int, cfg: float, classifier: Any = None,
                           progress: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
    """The teacher's multi-step (DDIM) sample scored on ``noise_sets`` sets of ``len(labels)`` images, and the first
    set's images. Set j draws from the generator seed ``seed + j·len(labels)``; the summary is
    :func:`wadi_distill.evaluation.noise.score_noise_sets`' (per metric mean, sd over the sets, values)."""
    from wadi_distill.builtin.digits.classifier import shipped_classifier
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.evaluation.noise import score_noise_sets

    classifier = classifier if classifier is not None else shipped_classifier()
    reference = load_split("reference")
    first: list[torch.Tensor] = []

    def score_set(start: int) -> dict[str, Any]:
        images = multistep_digits(bundle, labels, start, steps=steps, cfg=cfg, progress=progress)
        if not first:
            first.append(images)
        return evaluate_images(images, labels, reference, classifier=classifier)

    return score_noise_sets(score_set, noise_sets, len(labels), seed), first[0]


def score_one_step_digits(generator: str | Path | torch.nn.Module | None = None, *, noise_sets: int = EVAL_NOISE_SETS,
                          per_class: int = EVAL_PER_CLASS, seed: int = 0, teacher: str = "builtin:digits",
                          bundle: Any = None, classifier: Any = None) -> dict[str, Any]:
    """The digit metrics of a one-step generator on ``noise_sets`` sets of ``10·per_class`` images, with their noise.

    ``generator``: None (the teacher's own one-step sample), a student adapter (folder or ``adapter.safetensors``), a
    merged ``student.safetensors``, or a denoiser module. Set j uses the seeds of :func:`eval_seeds` shifted by
    ``j·10·per_class``; every set is scored against the held-out ``reference`` split. Returns
    :func:`wadi_distill.evaluation.noise.score_noise_sets`' summary: per metric the mean, the sd over the noise sets
    (the evaluation noise, None for one set) and the per-set values, with ``noise_sets`` and ``images_per_set``.
    """
    from wadi_distill.evaluation.noise import noise_set_starts, summarize_noise_sets

    starts = noise_set_starts(noise_sets, 10 * per_class)
    per_set = score_one_step_sets(generator, starts, per_class=per_class, seed=seed, teacher=teacher, bundle=bundle,
                                  classifier=classifier)
    return summarize_noise_sets(per_set, 10 * per_class, starts)


def score_one_step_sets(generator: str | Path | torch.nn.Module | None, starts: list[int], *,
                        per_class: int = EVAL_PER_CLASS, seed: int = 0, teacher: str = "builtin:digits",
                        bundle: Any = None, classifier: Any = None) -> list[dict[str, Any]]:
    """The metrics of the noise sets that start at ``starts`` (offsets into :func:`eval_seeds`), one dict each:
    :func:`score_one_step_digits` per set, so that sets scored in different processes summarise to the same result."""
    from wadi_distill.builtin.digits.classifier import shipped_classifier
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images

    labels = eval_labels(per_class)
    unet, bundle = _generator_unet(generator, teacher, bundle)
    classifier = classifier if classifier is not None else shipped_classifier()
    reference = load_split("reference")
    return [evaluate_images(one_step_digits(bundle, unet, labels, seed, offset=start), labels, reference,
                            classifier=classifier) for start in starts]


def _generator_unet(generator: str | Path | torch.nn.Module | None, teacher: str, bundle: Any) -> tuple[Any, Any]:
    """(denoiser, teacher bundle) of a generator given as None, a module, an adapter or merged weights."""
    from wadi_distill.teachers.pipeline import load_teacher

    if isinstance(generator, torch.nn.Module):
        return generator.eval(), bundle if bundle is not None else load_teacher(teacher)
    if generator is None:
        bundle = bundle if bundle is not None else load_teacher(teacher)
        return bundle.denoiser.eval(), bundle
    from wadi_distill.one_step import load_student

    path = Path(generator)
    merged = path.is_file() and path.name != "adapter.safetensors" and path.suffix == ".safetensors"
    student_bundle, unet = load_student(teacher, adapter=None if merged else path, merged=path if merged else None)
    return unet, bundle if bundle is not None else student_bundle


@torch.no_grad()
def multistep_digits(teacher: Any, labels: torch.Tensor, seed: int, *, steps: int, cfg: float,
                     device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """The teacher's own samples: DDIM with ``steps`` steps and CFG ``cfg``, (N, 1, 8, 8) in [-1, 1]."""
    from wadi_distill.sample import sample_multistep

    builtin = teacher.builtin
    generator = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    return sample_multistep(builtin, builtin.prompts_for_labels(labels.tolist()), steps=steps, cfg=cfg,
                            generator=generator, progress=progress).cpu()


def save_digit_grid(images: torch.Tensor, path: str | Path, per_row: int, scale: int = 4) -> Path:
    """Write (N, 1, 8, 8) images in [-1, 1] as one PNG, ``per_row`` to a row, upscaled ``scale``× (nearest)."""
    from wadi_distill.one_step import save_image_grid

    return save_image_grid((images.float() + 1.0) / 2.0, path, nrow=per_row, scale=scale)


def grid_subset(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` images of each class, class-major (a grid row per digit)."""
    picks = [images[labels == k][:per_class] for k in range(10)]
    return torch.cat(picks)


def metric_noise(row: dict[str, Any], key: str) -> str | None:
    """The evaluation noise of one metric of a table row (its sd over the noise sets) as text, None without one."""
    sd = row.get(f"{key}_sd")
    return None if sd is None else f"{sd:.2f}" if key.startswith("fd_") else f"{sd:.3f}"


def metrics_markdown(rows: list[dict[str, Any]], *, notes: list[str] | None = None) -> str:
    """The metrics table as Markdown (one row per model; best generated value per column in bold; ``± sd`` over the
    noise sets where a row has them)."""
    header = ["model", "steps/image", *(METRIC_TITLES[k] for k in METRIC_KEYS), "trainable params", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    generated = [r for r in rows if r["key"] != "real"]
    best: dict[str, float] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in generated if r.get(key) is not None]
        if values:
            best[key] = min(values) if key.startswith("fd_") else max(values)
    for row in rows:
        cells = [row["name"], str(row.get("steps_per_image", "–"))]
        for key in METRIC_KEYS:
            value = row.get(key)
            if value is None:
                cells.append("–")
                continue
            text = f"{value:.2f}" if key.startswith("fd_") else f"{value:.3f}"
            text = f"**{text}**" if row["key"] != "real" and value == best.get(key) else text
            noise = metric_noise(row, key)
            cells.append(f"{text} ± {noise}" if noise else text)
        params = row.get("trainable_params")
        cells.append(f"{params:,}" if params else "–")
        seconds = row.get("train_seconds")
        cells.append(f"{seconds:.0f}" if seconds else "–")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def _print(console: Any, message: str) -> None:
    if console is not None:
        console.print(message, highlight=False)


def _student_config(teacher_spec: str, output: Path, settings: DemoSettings, seed: int, progress: bool, steps: int,
                    lr: float, batch_size: int, fake_updates: int = 1, **student: Any):
    """The :class:`DistillConfig` of one demo student (``student``: its kind and layers)."""
    from wadi_distill.vsd.config import DistillConfig

    return DistillConfig(
        teacher=teacher_spec, output_dir=str(output), max_steps=steps, batch_size=batch_size,
        lr=lr, fake_lr=settings.fake_lr, fake_rank=settings.fake_rank, cfg=settings.vsd_cfg,
        fake_cfg=settings.vsd_fake_cfg, seed=seed, device="auto", checkpointing_steps=steps, tensorboard=False,
        fake_updates_per_step=fake_updates, progress=progress, final_samples=4, **student)


def _distill(config: Any, record: dict[str, Any], name: str):
    """Train ``config``'s student; ``record[name]`` gets the ``wadi-distill run`` options that train it again."""
    from wadi_distill.vsd.config import run_command_line, run_options
    from wadi_distill.vsd.trainer import distill

    # the config now holds the resolved values (the CFG default, the precision); on a stop signal the demo, which
    # removes its runs, says what happened (not the run's "continue with --resume")
    result = distill(config, stop_note=False)
    options = run_options(config)
    record[name] = {"run_options": options, "command": run_command_line(options)}
    return result


def _student_unet(teacher_spec: str, state_path: Path):
    """A fresh teacher bundle whose denoiser holds the merged student weights from ``state_path``."""
    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_distill.one_step import load_merged_weights

    bundle = load_teacher(teacher_spec)
    load_merged_weights(bundle.denoiser, state_path)
    return bundle.denoiser.eval()


# ------------------------------------------------------------------------------------------------ the demo


def run_demo(
    output_dir: str | Path = "reports/demo",
    *,
    full_steps: int | None = None,
    lorad_steps: int | None = None,
    batch_size: int | None = None,
    lorad_batch_size: int | None = None,
    full_fake_updates: int | None = None,
    lorad_fake_updates: int | None = None,
    ddim_steps: int | None = None,
    eval_per_class: int | None = None,
    processes: int | None = None,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    teacher: str = "builtin:digits",
    settings: DemoSettings | None = None,
    console: Any = None,
) -> DemoResult:
    """Run the whole demo (distil → probe → distil from the probe → evaluate) and write it into ``output_dir``.

    ``quick`` starts from :data:`QUICK_SETTINGS` instead of :data:`FULL_SETTINGS`; the keyword arguments override
    single settings (``batch_size`` sets the LoRaD student's too unless ``lorad_batch_size`` is given;
    ``full_fake_updates`` and ``lorad_fake_updates`` are each student's fake-score updates per student step;
    ``eval_per_class`` caps the multi-step teacher's images per class too; ``processes=1`` keeps
    the scoring in this process, after the training). ``teacher`` is
    ``builtin:digits`` or a folder written by ``wadi-distill train-teacher``.
    ``console`` (a rich Console) receives the stage headers and the probe summary; None prints nothing but the
    progress bars (``progress=False`` silences those too).
    """
    base = settings if settings is not None else (QUICK_SETTINGS if quick else FULL_SETTINGS)
    if lorad_batch_size is None:
        lorad_batch_size = batch_size
    overrides = {k: v for k, v in dict(full_steps=full_steps, lorad_steps=lorad_steps, batch_size=batch_size,
                                         lorad_batch_size=lorad_batch_size, full_fake_updates=full_fake_updates,
                                         lorad_fake_updates=lorad_fake_updates, ddim_steps=ddim_steps,
                                         eval_per_class=eval_per_class, processes=processes).items() if v is not None}
    if eval_per_class is not None:  # fewer images asked for: the multi-step teacher's sets shrink with them
        overrides["multistep_per_class"] = min(base.multistep_per_class, eval_per_class)
    settings = replace(base, **overrides)
    for name in ("full_steps", "lorad_steps", "batch_size", "lorad_batch_size", "full_fake_updates",
                 "lorad_fake_updates", "ddim_steps"):
        if getattr(settings, name) < 1:
            raise WadiInputError(f"{name.replace('_', '-')} must be at least 1.")
    if min(settings.eval_per_class, settings.multistep_per_class) < 2:
        raise WadiInputError("eval-per-class must be at least 2 (the metrics need more images than k = 3).")
    if settings.eval_noise_sets < 1:
        raise WadiInputError("eval-noise-sets must be at least 1.")
    if settings.processes < 1:
        raise WadiInputError("processes must be at least 1.")
    out = Path(output_dir)
    check_outputs({"demo folder": out}, ["builtin:digits"], owned=("demo folder",))
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    # SIGTERM / SIGUSR1 anywhere in the demo raise RunStopped (each training run catches them itself and stops after
    # its step), so the scratch runs are removed and the scoring process ended however the demo stops
    from wadi_distill.vsd.preemption import StopSignals

    stop = StopSignals().install()
    try:
        return _run(out, settings, seed=seed, quick=quick, progress=progress, teacher=teacher, console=console)
    finally:
        stop.restore()
        torch.set_num_threads(previous_threads)


def _train_full(teacher: str, out: Path, runs: Path, settings: DemoSettings, seed: int, progress: bool,
                console: Any, timings: dict[str, float], record: dict[str, Any]) -> tuple[Any, Path]:
    """Stage 1: full fine-tuning VSD; the merged student is kept as ``full_student.safetensors``."""
    _print(console, f"[bold]1/4[/bold] distilling {teacher} into a one-step student, full fine-tuning VSD "
                    f"({settings.full_steps} steps, batch {settings.batch_size}, "
                    f"{settings.full_fake_updates} fake-score updates per step)")
    t0 = time.perf_counter()
    config = _student_config(teacher, runs / "full", settings, seed, progress, settings.full_steps, settings.full_lr,
                             settings.batch_size, fake_updates=settings.full_fake_updates, student_adapter="full")
    full = _distill(config, record, "full_student")
    timings["train_full"] = time.perf_counter() - t0
    full_student_path = out / "full_student.safetensors"
    with atomic_path(full_student_path) as tmp:
        shutil.copyfile(full.merged_path, tmp)
    return full, full_student_path


def _probe_full(teacher: str, out: Path, full_student_path: Path, progress: bool, console: Any,
                timings: dict[str, float]) -> tuple[Any, Path, Any]:
    """Stage 2: the probe, teacher vs the fully fine-tuned student: (report, its path, its plots)."""
    from wadi_distill.teachers.pipeline import load_teacher
    from wadi_probe.analyze import compare
    from wadi_probe.report.plots import save_all_plots

    _print(console, "[bold]2/4[/bold] probing teacher vs the fully fine-tuned student")
    t0 = time.perf_counter()
    bundle = load_teacher(teacher)
    teacher_state = {k: v.detach().float().clone() for k, v in bundle.denoiser.state_dict().items()}
    report = compare(teacher_state, full_student_path, device="cpu", progress=progress)
    report.data["inputs"]["teacher"]["path"] = teacher
    report_path = report.save(out / "report.json")
    saved = save_all_plots(report, out / "plots", formats=("png",))
    timings["probe"] = time.perf_counter() - t0
    if console is not None:
        from wadi_probe.report.summary import print_summary

        print_summary(report, console, top=5)
        _print(console, f"report: {report_path}; plots: {out / 'plots'}")
        _print(console, f"the same report from the command line: wadi-probe compare {teacher} "
                        f"{full_student_path} -o {report_path} --plots {out / 'plots'}")
    return report, report_path, saved


def _train_lorad(teacher: str, out: Path, runs: Path, report_path: Path, settings: DemoSettings, seed: int,
                 progress: bool, console: Any, timings: dict[str, float],
                 record: dict[str, Any]) -> tuple[Any, Path, LoRaDConfig]:
    """Stage 3: VSD again with the LoRaD student the probe's report planned; the adapter is kept as ``lorad_student/``."""
    _print(console, f"[bold]3/4[/bold] distilling again: LoRaD student planned from the report "
                    f"(budget {settings.budget:.0%} of the backbone, {settings.lorad_steps} steps, batch "
                    f"{settings.lorad_batch_size}, "
                    f"{plural(settings.lorad_fake_updates, 'fake-score update')} per step)")
    t0 = time.perf_counter()
    config = _student_config(teacher, runs / "lorad", settings, seed, progress, settings.lorad_steps,
                             settings.lorad_lr, settings.lorad_batch_size, fake_updates=settings.lorad_fake_updates,
                             rank_from_probe=str(report_path), budget=settings.budget)
    lorad = _distill(config, record, "lorad_student")
    timings["train_lorad"] = time.perf_counter() - t0
    lorad_dir = out / "lorad_student"
    with atomic_path(lorad_dir, directory=True) as tmp:
        for name in ("adapter.safetensors", "adapter_config.json"):
            shutil.copyfile(lorad.final_dir / name, tmp / name)
    return lorad, lorad_dir, LoRaDConfig.load(lorad_dir)


def _collect_rows(scoring: "Scoring", teacher_rows: Any, full_row: Any, lorad_path: Path, settings: DemoSettings,
                  seed: int, teacher: str, out: Path, console: Any, timings: dict[str, float], full_params: int,
                  lorad_params: int) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Stage 4: score the LoRaD student here, collect the rows the scoring process computed meanwhile (or compute
    them now, in one process), save the grids, and add each student's trainable parameters and training time."""
    where = " (the teacher and the full student were scored in a second process meanwhile; the LoRaD student's " \
        "noise sets are shared between both)" if settings.processes >= 2 else ""
    _print(console, f"[bold]4/4[/bold] evaluating the teacher (multi-step and one step) and both students{where}")
    t0 = time.perf_counter()
    if scoring.processes >= 2:  # the second process is free once the full student is scored: share the last row
        lorad_row = _split_student_row(scoring, teacher, "lorad_student", lorad_path, settings, seed)
    else:
        lorad_row = score_student_row(teacher, "lorad_student", lorad_path, settings, seed)
    scored = [*teacher_rows.result(), full_row.result(), lorad_row]
    timings["evaluate"] = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    grids: dict[str, Path] = {}
    for row, grid in scored:
        if row["key"] == "full_student":
            row.update(trainable_params=full_params, train_seconds=timings["train_full"])
        elif row["key"] == "lorad_student":
            row.update(trainable_params=lorad_params, train_seconds=timings["train_lorad"])
        rows.append(row)
        grids[row["key"]] = save_digit_grid(grid, out / f"samples_{row['key']}.png", per_row=_grid_per_row(settings))
    return rows, grids


def _notes(settings: DemoSettings, rows: list[dict[str, Any]], plan: LoRaDConfig, lorad_params: int, wall: float,
           timings: dict[str, float]) -> list[str]:
    """The sentences under the metrics table: what was generated, how each model ran, and the time it all took."""
    return [
        f"each generated model scored on {plural(settings.eval_noise_sets, 'noise set')} of "
        f"{settings.eval_per_class * 10} one-step images ({settings.eval_per_class} per digit, the prompt 'a "
        f"handwritten digit k'; the multi-step teacher {settings.multistep_per_class * 10}) against the "
        f"{rows[0]['num_reference']} held-out reference digits: the mean over the sets ± their sd, the evaluation "
        f"noise (how far a new set moves a score; the mean of {settings.eval_noise_sets} moves about ± / "
        f"√{settings.eval_noise_sets}). The 'held-out real digits' row is the test split's "
        f"{rows[0]['num_images']} images scored the same way, one fixed set.",
        f"teacher multi-step: DDIM {settings.ddim_steps} steps with CFG {settings.teacher_cfg:g} "
        f"(2 UNet evaluations per step); one-step rows: one UNet evaluation at t = T−1 on the same noise seeds.",
        f"students: VSD (CFG {settings.vsd_cfg:g}"
        + ("" if settings.vsd_fake_cfg is None else f" on the real score, {settings.vsd_fake_cfg:g} on the fake score")
        + f", fake score LoRaD rank {settings.fake_rank} at lr {settings.fake_lr:g}); full: {settings.full_steps} "
        f"steps of batch {settings.batch_size} at lr {settings.full_lr:g}, every weight, "
        f"{plural(settings.full_fake_updates, 'fake-score update')} per step; "
        f"LoRaD: {settings.lorad_steps} steps of batch {settings.lorad_batch_size} at lr {settings.lorad_lr:g}, "
        f"{plural(settings.lorad_fake_updates, 'fake-score update')} per step, "
        f"{len(plan.target_modules)} layers and ranks chosen by the probe ({lorad_params:,} trainable parameters); "
        f"each student is scored from its final/, the average of its weights ({_weights_note()}); metrics.json "
        f"(settings.trained_with) has the wadi-distill run command that trains each one again.",
        f"wall time: {wall:.0f} s in total ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})"
        f", {plural(torch.get_num_threads(), 'torch thread')} per process"
        + ("; a second process scored the teacher's rows and the full student's while the students trained, then "
           "half of the LoRaD student's noise sets beside this one (evaluate: the time from the end of the training "
           "to the last score)." if settings.processes >= 2 else "; one process, each stage after the other."),
    ]


def _student_weights() -> dict[str, Any]:
    """Which weights the students' rows score: ``wadi-distill run``'s defaults, its ``final/``."""
    from wadi_distill.vsd.config import DistillConfig

    config = DistillConfig(teacher="", output_dir="")
    return {"weights": "final/ (the weight average)", "ema_decay": config.ema_decay, "ema_power": config.ema_power,
            "adam_weight_decay": config.adam_weight_decay}


def _weights_note() -> str:
    weights = _student_weights()
    return (f"EMA, decay min({weights['ema_decay']:g}, 1 - (1 + step)^-{weights['ema_power']:.3g}); "
            f"weight decay {weights['adam_weight_decay']:g}")


def _write_metrics(out: Path, record: dict[str, Any], rows: list[dict[str, Any]],
                   notes: list[str]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (each atomically); returns their paths."""
    metrics_json = write_json_atomic(out / "metrics.json", record)
    markdown = "# wadi-distill demo: metrics\n\n" + metrics_markdown(rows, notes=notes)
    metrics_md = out / "metrics.md"
    with atomic_path(metrics_md) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    return (Path(metrics_json) if metrics_json else out / "metrics.json"), metrics_md


def _run(out: Path, settings: DemoSettings, *, seed: int, quick: bool, progress: bool, teacher: str,
         console: Any) -> DemoResult:
    """The four stages in a scratch folder under ``out`` (removed afterwards, also on failure), then the records."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix=".runs-", dir=out))
    try:
        with Scoring(settings.processes, settings.threads) as scoring:
            # the teacher's rows need no student: with a second process they are scored while the students train
            teacher_rows = scoring.submit(score_teacher_rows, teacher, settings, seed,
                                          progress and settings.processes < 2)
            trained: dict[str, Any] = {}  # per student: the run options that train it again
            full, full_student_path = _train_full(teacher, out, runs, settings, seed, progress, console, timings,
                                                  trained)
            full_row = scoring.submit(score_student_row, teacher, "full_student", full_student_path, settings, seed)
            report, report_path, saved = _probe_full(teacher, out, full_student_path, progress, console, timings)
            lorad, lorad_dir, plan = _train_lorad(teacher, out, runs, report_path, settings, seed, progress, console,
                                                  timings, trained)
            lorad_params = sum(int(v.numel()) for v in lorad.student_state.values())
            full_params = sum(int(v.numel()) for v in full.student_state.values())
            _print(console, f"both students side by side: wadi-probe compare {teacher} {full_student_path} "
                            f"{lorad_dir} --label full --label lorad -o {out / 'students'}")
            rows, grids = _collect_rows(scoring, teacher_rows, full_row, lorad.merged_path, settings, seed, teacher, out,
                                        console, timings, full_params, lorad_params)
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    wall = time.perf_counter() - started
    timings["total"] = wall
    settings_record = {**asdict(settings), "seed": seed, "teacher": teacher, "quick": quick,
                       "torch_threads": torch.get_num_threads(), "students": _student_weights(),
                       "trained_with": trained}
    notes = _notes(settings, rows, plan, lorad_params, wall, timings)
    metrics_record = {"tool": "wadi-distill demo", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "settings": settings_record, "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
                      "probe_summary": _headline(report.summary), "plan": _plan_summary(plan, lorad_params),
                      "rows": rows}
    metrics_json, metrics_md = _write_metrics(out, metrics_record, rows, notes)
    return DemoResult(output_dir=out, rows=rows, summary=report.summary, report_path=report_path,
                      metrics_json=metrics_json, metrics_md=metrics_md,
                      grids=grids, plots=list(saved.files), full_student_path=full_student_path,
                      lorad_adapter_dir=lorad_dir, plan=_plan_summary(plan, lorad_params), timings=timings,
                      settings=settings_record, wall_seconds=wall)


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("layers", "matrices", "identical", "norm_change_mean", "norm_change_std", "angle_rad_mean",
            "direction_change_mean", "direction_change_std", "angle_to_norm_ratio", "paper_direction_to_norm_ratio",
            "residual_energy_at_30pct_rank_mean", "residual_energy_at_30pct_rank_chance_mean")
    return {k: summary.get(k) for k in keys}


def _plan_summary(adapter_config: LoRaDConfig, params: int) -> dict[str, Any]:
    """Layers and ranks of a saved adapter (its ``adapter_config.json``) and its trainable parameter count."""
    ranks = adapter_config.ranks()
    return {"layers": len(ranks), "trainable_params": params, "ranks": ranks}


#: The students' row names in the table (the teacher's rows are named in :func:`score_teacher_rows`).
STUDENT_ROW_NAMES = {"full_student": "full fine-tuning VSD student, one step",
                     "lorad_student": "LoRaD-from-probe VSD student, one step"}


def _grid_per_row(settings: DemoSettings) -> int:
    return min(settings.grid_per_class, settings.eval_per_class, settings.multistep_per_class)  # a row per digit


def _row(key: str, name: str, nfe: int | None, seconds: float | None, summary: dict[str, Any],
         num_reference: int) -> dict[str, Any]:
    noise = summary["metrics"]
    return {"key": key, "name": name, "steps_per_image": nfe or "–",
            "score_seconds": None if seconds is None else round(seconds, 2),
            **{k: noise[k]["mean"] if noise[k] else None for k in METRIC_KEYS},
            **{f"{k}_sd": noise[k]["sd"] if noise[k] else None for k in METRIC_KEYS},
            "noise_sets": summary["noise_sets"], "num_images": summary["images_per_set"],
            "num_reference": num_reference}


def score_teacher_rows(teacher_spec: str, settings: DemoSettings, seed: int,
                       progress: bool = False) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """The table's rows that need no student: held-out real digits (one fixed set), the teacher's multi-step DDIM
    sample and its own one-step sample (``settings.eval_noise_sets`` noise sets each), each with its grid images."""
    from wadi_distill.builtin.digits.classifier import shipped_classifier
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.evaluation.noise import score_noise_sets
    from wadi_distill.teachers.pipeline import load_teacher

    bundle = load_teacher(teacher_spec)
    classifier = shipped_classifier()
    reference = load_split("reference")
    per_row = _grid_per_row(settings)
    test = load_split("test")
    real_labels = torch.cat([test.labels[test.labels == k][: settings.eval_per_class] for k in range(10)])
    real_images = torch.cat([test.images[test.labels == k][: settings.eval_per_class] for k in range(10)])
    summary = score_noise_sets(lambda _: evaluate_images(real_images, real_labels, reference, classifier=classifier),
                               1, len(real_images))
    rows = [(_row("real", "held-out real digits (test split)", None, None, summary, len(reference)),
             grid_subset(real_images, real_labels, per_row))]

    t0 = time.perf_counter()
    labels = eval_labels(settings.multistep_per_class)
    summary, first = score_multistep_digits(bundle, labels, noise_sets=settings.eval_noise_sets, seed=seed,
                                            steps=settings.ddim_steps, cfg=settings.teacher_cfg,
                                            classifier=classifier, progress=progress)
    name = f"teacher, DDIM {settings.ddim_steps} steps + CFG {settings.teacher_cfg:g}"
    rows.append((_row("teacher_multistep", name, 2 * settings.ddim_steps, time.perf_counter() - t0, summary,
                      len(reference)), grid_subset(first, labels, per_row)))  # the grid: the first set's images
    rows.append(_score_one_step_row("teacher_one_step", "teacher, one step", bundle.denoiser, bundle, settings, seed,
                                    classifier, reference))
    return rows


def score_student_row(teacher_spec: str, key: str, state_path: str | Path, settings: DemoSettings,
                      seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """One student's row (``key``: ``full_student`` or ``lorad_student``) from its merged weights, with its grid."""
    from wadi_distill.builtin.digits.classifier import shipped_classifier
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.teachers.pipeline import load_teacher

    unet = _student_unet(teacher_spec, Path(state_path))
    return _score_one_step_row(key, STUDENT_ROW_NAMES[key], unet, load_teacher(teacher_spec), settings, seed,
                               shipped_classifier(), load_split("reference"))


def score_student_sets(teacher_spec: str, state_path: str | Path, settings: DemoSettings, seed: int,
                       starts: list[int]) -> list[dict[str, Any]]:
    """A student's metrics on the noise sets that start at ``starts`` (a share of its row's sets)."""
    return score_one_step_sets(_student_unet(teacher_spec, Path(state_path)), starts,
                               per_class=settings.eval_per_class, seed=seed, teacher=teacher_spec)


def _split_student_row(scoring: "Scoring", teacher_spec: str, key: str, state_path: Path, settings: DemoSettings,
                       seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """A student's row with its first noise sets scored in the second process and the rest here, at the same time
    (the same numbers as :func:`score_student_row`: each set is scored alone, from the same seeds)."""
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluation.noise import noise_set_starts, summarize_noise_sets
    from wadi_distill.teachers.pipeline import load_teacher

    t0 = time.perf_counter()
    images = 10 * settings.eval_per_class
    starts = noise_set_starts(settings.eval_noise_sets, images)
    there = starts[: len(starts) // 2]
    remote = scoring.submit(score_student_sets, teacher_spec, state_path, settings, seed, there)
    bundle = load_teacher(teacher_spec)
    unet = _student_unet(teacher_spec, state_path)
    here = score_one_step_sets(unet, starts[len(there):], per_class=settings.eval_per_class, seed=seed,
                               bundle=bundle)
    grid = one_step_digits(bundle, unet, eval_labels(_grid_per_row(settings)), seed)
    summary = summarize_noise_sets([*remote.result(), *here], images, starts)
    return _row(key, STUDENT_ROW_NAMES[key], 1, time.perf_counter() - t0, summary,
                len(load_split("reference"))), grid


def _score_one_step_row(key: str, name: str, unet: torch.nn.Module, bundle: Any, settings: DemoSettings, seed: int,
                        classifier: Any, reference: Any) -> tuple[dict[str, Any], torch.Tensor]:
    t0 = time.perf_counter()
    summary = score_one_step_digits(unet, noise_sets=settings.eval_noise_sets, per_class=settings.eval_per_class,
                                    seed=seed, bundle=bundle, classifier=classifier)
    grid = one_step_digits(bundle, unet, eval_labels(_grid_per_row(settings)), seed)
    return _row(key, name, 1, time.perf_counter() - t0, summary, len(reference)), grid


# ------------------------------------------------------------------------------------ a second scoring process


class _Deferred:
    """A call made when its result is first asked for (the one-process demo: scoring after training, in order)."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._call: Callable[[], Any] | None = lambda: fn(*args)
        self._value: Any = None

    def result(self) -> Any:
        if self._call is not None:
            self._value, self._call = self._call(), None
        return self._value


class _Remote:
    """A call running in the scoring process."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def result(self) -> Any:
        return _convert(self._handle.get(), np.ndarray, torch.from_numpy)


def _convert(value: Any, kind: type, convert: Callable[[Any], Any]) -> Any:
    """``value`` with every ``kind`` inside its tuples, lists and dicts replaced by ``convert(it)``."""
    if isinstance(value, kind):
        return convert(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, kind, convert) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, kind, convert) for k, v in value.items()}
    return value


def _with_arrays(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the scoring process with its tensors as numpy arrays: plain pickles, no shared-memory
    tensors that would need this process alive after it has answered."""
    return _convert(fn(*args), torch.Tensor, lambda t: t.numpy())


def _scoring_process_init(threads: int | None) -> None:
    """Start of the scoring process: the demo's torch threads; Ctrl-C is the demo's to handle (it then ends this
    process); on Linux the process also ends when the demo's process dies, so a killed demo leaves nothing running."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the demo's own exit still terminates this process
            pass
    if threads:
        torch.set_num_threads(int(threads))


class Scoring:
    """Where the demo's scores are computed: in one second process (``processes`` ≥ 2), started at once so that
    it works while this process trains, calls queued in order; or, with 1, here, each when its result is asked for.

    Use as a context manager: leaving it (also on an error or Ctrl-C) ends the second process."""

    def __init__(self, processes: int, threads: int | None) -> None:
        self.processes = processes
        self.threads = threads
        self._pool: Any = None

    def __enter__(self) -> "Scoring":
        if self.processes >= 2:
            import multiprocessing

            # spawn, not fork: a forked child would inherit this process's torch thread pools and open files
            self._pool = multiprocessing.get_context("spawn").Pool(1, initializer=_scoring_process_init,
                                                                    initargs=(self.threads,))
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> "_Deferred | _Remote":
        """``fn(*args)``, its result collected by ``result()`` (tensors in it cross the pipe as numpy arrays)."""
        if self._pool is None:
            return _Deferred(fn, args)
        return _Remote(self._pool.apply_async(_with_arrays, (fn, *args)))

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
