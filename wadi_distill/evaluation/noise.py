"""The evaluation noise of a score: the same generator scored on K noise sets of N images each.

A one-step generator's metrics depend on which noise it was given. Scoring it on K sets of noise seeds (set j
takes the N seeds from ``first + j·N``: no seed is used twice) and reporting the mean and the sample standard
deviation over the sets says how far a second scoring of the same generator would move the number: the
evaluation noise. The reference images stay the same in every set, so their own sampling noise is not in it.

:func:`score_noise_sets` is the one loop; what scores one set (generating and scoring images in memory, or
writing them to a folder and scoring that) is the caller's ``score_set``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from wadi_probe.errors import WadiInputError

__all__ = ["check_noise_sets", "noise_set_starts", "summarize_noise_sets", "score_noise_sets", "evaluate_noise_sets"]

#: per-set record keys that are counts or settings, not metrics
NOT_METRICS = ("num_images", "num_reference", "kid_subset_size", "kid_std", "clip_score_std")


def check_noise_sets(noise_sets: int) -> None:
    """Refuse fewer than one noise set."""
    if int(noise_sets) < 1:
        raise WadiInputError(f"the number of noise sets must be at least 1, not {noise_sets}.")


def noise_set_starts(noise_sets: int, images_per_set: int, first: int = 0) -> list[int]:
    """The first seed of each noise set: ``first + j·images_per_set`` (the sets' seeds do not overlap)."""
    check_noise_sets(noise_sets)
    if int(images_per_set) < 1:
        raise WadiInputError(f"a noise set needs at least one image, not {images_per_set}.")
    return [int(first) + j * int(images_per_set) for j in range(int(noise_sets))]


def summarize_noise_sets(per_set: list[dict[str, Any]], images_per_set: int, starts: list[int]) -> dict[str, Any]:
    """Per metric the mean, the sample sd over the sets (ddof 1; None for one set) and the per-set values.

    Keys that are None in every set (e.g. class accuracy without labels) stay None; counts are left out.
    """
    if not per_set:
        raise WadiInputError("there are no noise sets to summarise.")
    metrics: dict[str, Any] = {}
    for key, first in per_set[0].items():
        if key in NOT_METRICS or isinstance(first, (bool, str)) or not (first is None or isinstance(first, (int, float))):
            continue
        values = [row.get(key) for row in per_set]
        if all(v is None for v in values):
            metrics[key] = None
            continue
        array = np.asarray(values, dtype=np.float64)
        metrics[key] = {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
                        "values": [float(v) for v in array]}
    return {"noise_sets": len(per_set), "images_per_set": int(images_per_set), "first_seeds": [int(s) for s in starts],
            "metrics": metrics}


def score_noise_sets(score_set: Callable[[int], dict[str, Any]], noise_sets: int, images_per_set: int,
                     first: int = 0) -> dict[str, Any]:
    """Call ``score_set(start)`` for each noise set's first seed and summarise (:func:`summarize_noise_sets`).

    ``score_set`` generates ``images_per_set`` images from the seeds ``start, start + 1, …`` and returns their metrics
    (a dict of numbers). The summary holds ``noise_sets`` (K), ``images_per_set`` (N), ``first_seeds`` and, per
    metric, ``mean``, ``sd`` (the evaluation noise) and ``values``.
    """
    starts = noise_set_starts(noise_sets, images_per_set, first)
    return summarize_noise_sets([score_set(start) for start in starts], images_per_set, starts)


def evaluate_noise_sets(teacher: str, prompts: list[str], folder: str | Path, reference: str, extractor: Any, *,
                        noise_sets: int, adapter: str | Path | None = None, merged: str | Path | None = None,
                        prompts_file: str | Path | None = None, seed: int = 0, batch_size: int = 50,
                        device: str = "cpu", max_hours: float | None = None, settings: Any = None, clip: Any = None,
                        output: str | Path | None = None) -> dict[str, Any]:
    """``wadi-distill evaluate`` with ``--noise-sets K``: K generations of one image per prompt, each scored.

    Set j is written to ``folder/set-j`` from the seeds ``seed + j·len(prompts) + i`` and scored with
    :func:`wadi_distill.evaluation.protocol.evaluate`. The record is the first set's record with ``metrics``
    replaced by the means over the sets, ``noise`` (:func:`summarize_noise_sets`: per metric mean, sd and values)
    and ``generation`` (one record per set); it is written to ``output`` (JSON) when given.
    """
    from wadi_distill.evaluation.inputs import generate_for_evaluation
    from wadi_distill.evaluation.protocol import evaluate
    from wadi_probe.io.atomic import write_json_atomic

    folder = Path(folder)
    records: list[dict[str, Any]] = []

    def score_set(start: int) -> dict[str, Any]:
        images = folder / f"set-{len(records)}"
        generation = generate_for_evaluation(teacher, prompts, images, prompts_file=prompts_file, adapter=adapter,
                                             merged=merged, seed=start, batch_size=batch_size, device=device,
                                             max_hours=max_hours)
        records.append(evaluate(images, reference, extractor, settings=settings, clip=clip, prompts=prompts,
                                generation=generation))
        return records[-1]["metrics"]

    summary = score_noise_sets(score_set, noise_sets, len(prompts), seed)
    record = dict(records[0])
    record["images"] = str(folder)
    record["metrics"] = {**record["metrics"], **{k: (v["mean"] if v is not None else None)
                                                 for k, v in summary["metrics"].items()}}
    record["noise"] = summary
    record["generation"] = [r["generation"] for r in records]
    record["seconds"] = round(sum(r["seconds"] for r in records), 3)
    if output is not None:
        write_json_atomic(output, record)
    return record
