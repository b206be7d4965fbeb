"""Sample-quality metrics: Fréchet distance, precision/recall, class accuracy.

- ``frechet_distance(a, b)``: ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2·(Σ_a Σ_b)^{1/2})`` in fp64 (the FID formula),
  on any feature vectors: raw pixels, the digit classifier's features, or a real model's features.
  ``tr((Σ_a Σ_b)^{1/2})`` is computed as ``Σ sqrt(eig(S_a Σ_b S_a))`` with ``S_a = Σ_a^{1/2}``: the same value
  as scipy's ``sqrtm`` route, but symmetric, so it never returns complex noise.
- ``precision_recall(real, fake, k=3)``: Kynkäänniemi et al. (2019). A sample lies on the other set's manifold
  when it is within the k-th-nearest-neighbour radius of some point of that set. Precision = share of fake samples
  on the real manifold (are they realistic?), recall = share of real samples on the fake manifold (is the variety
  covered?).
- ``class_accuracy``: share of conditional samples the digit classifier assigns to the class they were asked for
  (the analogue of a CLIP score).

``evaluate_images`` applies all of them to digit images against the held-out ``reference`` split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wadi_probe.errors import WadiInputError


def _as_float64_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        array = array.reshape(array.shape[0], -1)
    if array.shape[0] < 2:
        raise WadiInputError(f"{name} needs at least two samples, got {array.shape[0]}.")
    if not np.isfinite(array).all():
        raise WadiInputError(f"{name} contains NaN or Inf values.")
    return array


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between two Gaussians N(μ_a, Σ_a), N(μ_b, Σ_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise WadiInputError("The two feature sets have different dimensions.")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two sets of feature vectors (N, D) (fp64)."""
    a = _as_float64_matrix(feats_a, "The first feature set")
    b = _as_float64_matrix(feats_b, "The second feature set")
    if a.shape[1] != b.shape[1]:
        raise WadiInputError(f"Feature sets have different widths ({a.shape[1]} vs {b.shape[1]}).")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


ROWS_PER_CHUNK = 1024  # distance rows computed at a time: memory ~ ROWS_PER_CHUNK × N instead of N × N


def _kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(points), ROWS_PER_CHUNK):
        distances = torch.cdist(points[start:start + ROWS_PER_CHUNK], points)
        # the k+1-th smallest distance: the point itself is one of them (distance 0); duplicates are real neighbours.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each of ``points`` lies within the radius of some of ``centres`` (chunked over ``points``)."""
    inside = [(torch.cdist(points[start:start + ROWS_PER_CHUNK], centres) <= radii[None, :]).any(dim=1)
              for start in range(0, len(points), ROWS_PER_CHUNK)]
    return torch.cat(inside)


def check_k(k: int) -> None:
    """Refuse a neighbour count below 1 (the k-NN radius of a point needs at least one other point)."""
    if int(k) < 1:
        raise WadiInputError(f"k (the neighbours of precision/recall) must be at least 1, not {k}.")


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, in fp64.

    Distances are computed ``ROWS_PER_CHUNK`` rows at a time, so memory grows with the set sizes, not their product.
    """
    real_t = torch.from_numpy(_as_float64_matrix(real, "The real feature set"))
    fake_t = torch.from_numpy(_as_float64_matrix(fake, "The generated feature set"))
    if real_t.shape[1] != fake_t.shape[1]:
        raise WadiInputError(f"Feature sets have different widths ({real_t.shape[1]} vs {fake_t.shape[1]}).")
    check_k(k)
    if k >= min(len(real_t), len(fake_t)):
        raise WadiInputError(f"k = {k} needs more than {k} samples in each set (got {len(real_t)} real and "
                             f"{len(fake_t)} generated).")
    precision = _covered(fake_t, real_t, _kth_neighbour_radii(real_t, k)).double().mean().item()
    recall = _covered(real_t, fake_t, _kth_neighbour_radii(fake_t, k)).double().mean().item()
    return float(precision), float(recall)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int], classifier=None) -> float:
    """Share of ``images`` the digit classifier assigns to their requested ``labels``."""
    from wadi_distill.builtin.digits.classifier import shipped_classifier

    classifier = classifier if classifier is not None else shipped_classifier()
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    if len(labels_t) != len(images):
        raise WadiInputError(f"Got {len(images)} images but {len(labels_t)} labels.")
    return float((classifier.predict(images).cpu() == labels_t).double().mean())


def evaluate_images(images: torch.Tensor, labels: torch.Tensor | list[int] | None = None, reference: Any = None,
                    *, classifier=None, k: int = 3) -> dict[str, float]:
    """All metrics for digit ``images`` (N, 1, 8, 8) in [-1, 1] against ``reference`` real digits.

    ``reference`` is a :class:`~wadi_distill.builtin.digits.data.DigitsSplit`, an image tensor, or None for the held-out
    ``reference`` split. ``labels`` (the classes the images were asked for) enable ``class_accuracy``.
    Returned keys: ``fd_pixel``, ``fd_features``, ``precision``, ``recall``, ``class_accuracy`` (or None),
    ``num_images``, ``num_reference``.
    """
    from wadi_distill.builtin.digits.classifier import shipped_classifier
    from wadi_distill.builtin.digits.data import load_split

    classifier = classifier if classifier is not None else shipped_classifier()
    if reference is None:
        reference = load_split("reference")
    reference_images = reference.images if hasattr(reference, "images") else torch.as_tensor(reference)
    images = images.detach().float().cpu()
    if images.shape[1:] != reference_images.shape[1:]:
        raise WadiInputError(f"Images of shape {tuple(images.shape[1:])} cannot be compared with reference digits "
                             f"of shape {tuple(reference_images.shape[1:])}.")
    if not torch.isfinite(images).all():
        raise WadiInputError("The images contain NaN or Inf values.")
    fake_features = classifier.embed(images).cpu()
    real_features = classifier.embed(reference_images).cpu()
    precision, recall = precision_recall(real_features, fake_features, k=k)
    return {
        "fd_pixel": frechet_distance(reference_images.flatten(1), images.flatten(1)),
        "fd_features": frechet_distance(real_features, fake_features),
        "precision": precision,
        "recall": recall,
        "class_accuracy": class_accuracy(images, labels, classifier) if labels is not None else None,
        "num_images": int(len(images)),
        "num_reference": int(len(reference_images)),
    }
