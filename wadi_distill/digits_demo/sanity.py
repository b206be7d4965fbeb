"""The metrics' sanity table: do they rank real digits first and blur, class means and noise far behind?

Every row is 300 images carrying the ``test`` split's labels (30 per class), scored against the held-out
``reference`` split (a disjoint 300):

- held-out real digits (the ``test`` split itself): the best a generator can reach at this sample size;
- the teacher, multi-step DDIM with CFG, prompted with the same labels;
- class means: every image replaced by the mean training image of its class (right class, no variety);
- Gaussian-blurred real digits (σ = 1 pixel): right class and layout, no sharp strokes;
- uniform noise in [-1, 1].

A metric that scores blur or class means as well as real digits would be useless for judging one-step students.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wadi_distill.builtin.digits.data import load_split

LOWER_IS_BETTER = {"fd_pixel": True, "fd_features": True, "precision": False, "recall": False, "class_accuracy": False}


def class_mean_images(labels: torch.Tensor) -> torch.Tensor:
    """For each label, the mean training image of that class."""
    train = load_split("train")
    means = torch.stack([train.images[train.labels == k].mean(0) for k in range(10)])
    return means[labels]


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Blur (N, C, H, W) images with a separable Gaussian of ``sigma`` pixels (edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = torch.nn.functional.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def uniform_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` images of i.i.d. uniform noise in [-1, 1]."""
    return torch.rand((count, 1, 8, 8), generator=generator) * 2.0 - 1.0


def sanity_rows(teacher=None, *, steps: int = 50, cfg: float = 2.0, seed: int = 0, blur_sigma: float = 1.0,
                classifier=None, device: torch.device | str = "cpu", count: int | None = None) -> list[dict[str, Any]]:
    """Score each candidate set against the ``reference`` split; one dict per row (name + metrics).

    ``teacher`` None skips the teacher row. ``count`` limits every row to the first ``count`` test images
    (for quick tests); the reference split is always used whole.
    """
    from wadi_distill.evaluate import evaluate_images
    from wadi_distill.sample import sample_multistep

    reference = load_split("reference")
    test = load_split("test")
    images, labels = test.images, test.labels
    if count is not None:
        images, labels = images[:count], labels[:count]
    generator = torch.Generator().manual_seed(seed)
    candidates: list[tuple[str, torch.Tensor]] = [("held-out real digits (test split)", images)]
    if teacher is not None:
        noise_gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
        samples = sample_multistep(teacher, teacher.prompts_for_labels(labels.tolist()), steps=steps, cfg=cfg,
                                   generator=noise_gen)
        candidates.append((f"teacher, DDIM {steps} steps, CFG {cfg:g}", samples.cpu()))
    candidates += [
        ("class means (train split)", class_mean_images(labels)),
        (f"Gaussian-blurred real digits (σ = {blur_sigma:g} px)", gaussian_blur(images, blur_sigma)),
        ("uniform noise", uniform_noise(len(labels), generator)),
    ]
    rows = []
    for name, candidate in candidates:
        metrics = evaluate_images(candidate, labels, reference, classifier=classifier)
        rows.append({"name": name, **metrics})
    return rows


def ordering_violations(rows: list[dict[str, Any]], *, real: int = 0, model: int = 1,
                        degraded: tuple[int, ...] = (2, 3, 4)) -> list[str]:
    """Metric/row pairs where the model row fails to beat a degraded row (ties included); empty when sane.

    Class accuracy and precision cannot separate class means (or blur) from real digits by design (a class
    mean is a perfectly recognisable digit); those rows are reported but only checked where the metric can
    tell them apart, i.e. FD (pixel and feature) and recall against every degraded row, plus every metric
    against noise.
    """
    problems = []
    for index in degraded:
        bad = rows[index]
        metrics = ("fd_pixel", "fd_features", "recall")
        if "noise" in bad["name"]:
            metrics = tuple(LOWER_IS_BETTER)
        for metric in metrics:
            good_value, bad_value = rows[model][metric], bad[metric]
            if good_value is None or bad_value is None:
                continue
            better = good_value < bad_value if LOWER_IS_BETTER[metric] else good_value > bad_value
            if not better:
                problems.append(f"{metric}: '{rows[model]['name']}' ({good_value:.4g}) does not beat "
                                f"'{bad['name']}' ({bad_value:.4g})")
    return problems


def sanity_markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The table as Markdown, with the settings that made it."""
    lines = [
        "| images | FD pixel ↓ | FD features ↓ | precision ↑ | recall ↑ | class accuracy ↑ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        accuracy = "–" if row["class_accuracy"] is None else f"{row['class_accuracy']:.3f}"
        lines.append(f"| {row['name']} | {row['fd_pixel']:.2f} | {row['fd_features']:.2f} | "
                     f"{row['precision']:.3f} | {row['recall']:.3f} | {accuracy} |")
    settings_text = ", ".join(f"{k} = {v}" for k, v in settings.items())
    return "\n".join(lines) + f"\n\nSettings: {settings_text}.\n"
