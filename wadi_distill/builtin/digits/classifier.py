"""The digit classifier whose features the metrics use (the digits analogue of Inception / CLIP features).

A small CNN on 8×8 model-range images ([-1, 1]): two 3×3 conv stages with max-pooling, a 64-unit penultimate
layer (``features``) and a 10-way output (``predict``). It is trained once on the ``train`` split, seeded, and
ships in ``wadi_distill/builtin/digits/``; in eval mode it has no randomness, so every metric built on it is
deterministic. Training uses ±1-pixel shifts so that its features describe digit shape, not exact placement.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.io.formats.safetensors_io import write_safetensors
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

CLASSIFIER_FILE = "digits_classifier.safetensors"
CLASSIFIER_CONFIG_FILE = "digits_classifier.json"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """CNN for (N, 1, 8, 8) digits in [-1, 1]: ``features`` (N, 64) and 10 logits."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4×4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 2×2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise WadiInputError(f"The digit classifier takes images of shape (N, 1, 8, 8), not {tuple(images.shape)}.")
        param = next(self.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, 64): the space the Fréchet distance and precision/recall live in."""
        return self.body(self._check(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted digit per image (N,)."""
        return torch.cat([self(images[i:i + batch_size]).argmax(dim=1) for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """``features`` in batches, without gradients."""
        return torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in x and y, filling with background (-1)."""
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 40, batch_size: int = 64,
                     learning_rate: float = 2e-3, seed: int = 0, device: torch.device | str = "cpu") -> DigitClassifier:
    """Train the classifier (seeded, AdamW, cosine decay) and return it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = _random_shift(images[idx], generator).to(device)
            loss = nn.functional.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def save_classifier(model: DigitClassifier, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write the classifier's weights (fp32) and a JSON record into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / CLASSIFIER_FILE) as tmp:
        write_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_json_atomic(directory / CLASSIFIER_CONFIG_FILE, {"feature_dim": model.feature_dim, **(metadata or {})})
    return directory


def load_classifier(directory: str | Path | None = None, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load the shipped classifier (or one saved in ``directory``), eval mode, gradients off."""
    from wadi_distill.builtin.digits.model import BUILTIN_DIR

    directory = Path(directory) if directory is not None else BUILTIN_DIR
    path = directory / CLASSIFIER_FILE
    if not path.is_file():
        raise WadiInputError(f"No digit classifier at {path}; run `python benchmarks/digits_sanity.py --train-classifier`.")
    record = read_json(directory / CLASSIFIER_CONFIG_FILE)
    model = DigitClassifier(feature_dim=int(record.get("feature_dim", FEATURE_DIM)))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


_SHIPPED: dict[str, DigitClassifier] = {}


def shipped_classifier(device: torch.device | str = "cpu") -> DigitClassifier:
    """The shipped classifier, loaded once per device and reused."""
    key = str(torch.device(device))
    if key not in _SHIPPED:
        _SHIPPED[key] = load_classifier(device=device)
    return _SHIPPED[key]


def classifier_training_run(seed: int = 0, device: torch.device | str = "cpu") -> tuple[DigitClassifier, dict]:
    """Train on the ``train`` split and measure held-out accuracy; returns the model and its JSON record."""
    from wadi_distill.builtin.digits.data import load_split, split_description

    train = load_split("train")
    start = time.perf_counter()
    model = train_classifier(train.images, train.labels, seed=seed, device=device)
    wall = time.perf_counter() - start
    accuracy = {}
    for name in ("reference", "test"):
        part = load_split(name)
        accuracy[name] = float((model.predict(part.images).cpu() == part.labels).float().mean())
    record = {"seed": seed, "device": str(device), "wall_seconds": round(wall, 1), "data_split": split_description(),
              "held_out_accuracy": accuracy, "torch_version": torch.__version__}
    return model, record
