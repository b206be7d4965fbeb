"""The handwritten-digits data behind ``builtin:digits``: scikit-learn's bundled 8×8 digits, split once, for good.

``sklearn.datasets.load_digits`` ships with scikit-learn (no download): 1,797 grey images of 8×8 pixels with
values 0..16. The model works at the native 8×8 resolution: upsampling would add no information, only pixels
to denoise (a 16×16 UNet step costs about 4× more on a CPU), and a 64-dimensional pixel space keeps the
pixel-space Fréchet distance well estimated from a few hundred images.

The split is stratified by class and fixed by a seed, in three disjoint parts:

- ``train``: what the teacher and the feature classifier learn from;
- ``reference``: held-out real digits that every generated set is compared against;
- ``test``: other held-out real digits, scored against ``reference`` as the "real data" row of the sanity
  table (the best any generator can hope for at this sample size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wadi_probe.errors import WadiInputError

IMAGE_SIZE = 8
CHANNELS = 1
NUM_CLASSES = 10
PIXEL_MAX = 16.0
SPLIT_SEED = 0
REFERENCE_PER_CLASS = 30
TEST_PER_CLASS = 30
SPLIT_NAMES = ("train", "reference", "test")


@dataclass(frozen=True)
class DigitsSplit:
    """One part of the digits data: images in [-1, 1] of shape (N, 1, 8, 8) and integer labels (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray  # rows of ``load_digits()`` this part holds, so the split can be written down and checked

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def to_model_range(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map raw digit intensities 0..16 to the model's range [-1, 1] (float32)."""
    x = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    return x / (PIXEL_MAX / 2.0) - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model-range images [-1, 1] to [0, 1] (for display and image files), clamping what a sampler overshoots."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def split_indices(seed: int = SPLIT_SEED, reference_per_class: int = REFERENCE_PER_CLASS,
                  test_per_class: int = TEST_PER_CLASS) -> dict[str, np.ndarray]:
    """Return the row indices of each part, stratified by class and reproducible from ``seed``."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for digit in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == digit)
        if len(rows) <= reference_per_class + test_per_class:
            raise WadiInputError(f"Digit {digit} has only {len(rows)} images, too few for the requested held-out sizes.")
        rows = rng.permutation(rows)
        parts["reference"].append(rows[:reference_per_class])
        parts["test"].append(rows[reference_per_class:reference_per_class + test_per_class])
        parts["train"].append(rows[reference_per_class + test_per_class:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_split(name: str, seed: int = SPLIT_SEED) -> DigitsSplit:
    """Load one part (``"train"``, ``"reference"`` or ``"test"``) of the fixed split as model-range tensors."""
    if name not in SPLIT_NAMES:
        raise WadiInputError(f"Unknown digits split {name!r}; use one of {', '.join(SPLIT_NAMES)}.")
    from sklearn.datasets import load_digits

    data = load_digits()
    rows = split_indices(seed)[name]
    images = to_model_range(data.images[rows]).reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.as_tensor(data.target[rows], dtype=torch.long)
    return DigitsSplit(name=name, images=images, labels=labels, indices=rows)


def split_description(seed: int = SPLIT_SEED) -> dict:
    """A JSON-ready record of the split (seed, sizes per part), written next to trained weights."""
    parts = split_indices(seed)
    return {
        "source": "sklearn.datasets.load_digits",
        "seed": seed,
        "stratified_by_class": True,
        "reference_per_class": REFERENCE_PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
        "sizes": {name: int(len(rows)) for name, rows in parts.items()},
        "pixel_range": "raw 0..16 mapped linearly to [-1, 1]",
        "image_size": IMAGE_SIZE,
    }
