"""Feature extractors for FID / KID / precision-recall, each from a LOCAL weights file (nothing is downloaded).

- :func:`inception_extractor`: torch-fidelity's TF-compatible InceptionV3 (the network of the original FID code
  and of clean-fid), 2048-d pool features, with its own TF-style bilinear resize to 299. Weights: torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``, read here with ``weights_only=True`` before torch-fidelity
  loads it, so a file that needs code to unpickle is refused.
- :func:`torchscript_extractor`: any TorchScript module mapping uint8 images (B, 3, H, W) to features (B, D),
  e.g. a DINOv2 or a small test network.
- :func:`digits_extractor`: the shipped digit classifier's 64-d features, for ``builtin:digits`` (8×8 grayscale).

Every extractor records its file, the file's SHA-256 and its feature width, since they change every number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["Extractor", "INCEPTION_FILE", "file_sha256", "inception_extractor", "torchscript_extractor", "digits_extractor"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class Extractor:
    """A feature function on uint8 image batches, with what identifies it."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    input: str  # "rgb" (uint8 (B, 3, H, W) after the protocol resize) or "digits" ((B, 1, 8, 8) in [-1, 1])
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch).detach().double().cpu()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing(path: str | Path | None, needed: str) -> Path:
    if path is None:
        raise WadiInputError(needed)
    path = Path(path).expanduser()
    if path.is_dir():
        raise WadiInputError(f"{path} is a folder, not a weights file: {needed}")
    if not path.is_file():
        raise WadiInputError(f"{path} does not exist: {needed}")
    return path


def _fidelity_inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, also where torchvision is missing.

    torch-fidelity's package ``__init__`` imports its CLIP/VGG/DINOv2 extractors and dataset helpers, which need
    torchvision; the InceptionV3 module itself needs torch only. CPU-only torch builds often have no matching
    torchvision (installing one from PyPI would replace torch), so when that import fails on torchvision alone the
    package's own modules are imported without running its ``__init__``.
    """
    import importlib
    import importlib.util
    import sys
    import types

    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ImportError as exc:
        spec = importlib.util.find_spec("torch_fidelity") if "torch_fidelity" not in sys.modules else None
        if getattr(exc, "name", None) != "torchvision" or spec is None or not spec.submodule_search_locations:
            raise WadiInputError("FID with Inception needs torch-fidelity (pip install --no-deps torch-fidelity).") from exc
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def inception_extractor(path: str | Path | None, device: str | torch.device = "cpu") -> Extractor:
    """torch-fidelity's InceptionV3 (2048-d) from the local weights file ``path``."""
    path = _existing(path, f"FID needs the Inception weights file {INCEPTION_FILE} (torch-fidelity's InceptionV3); "
                           "download it once and pass --inception PATH.")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means it is not a plain weights file
        raise WadiInputError(f"{path} is not a plain InceptionV3 state dict ({type(exc).__name__}); expected {INCEPTION_FILE}.") from exc
    inception_class = _fidelity_inception_class()
    try:
        model = inception_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as exc:
        raise WadiInputError(f"{path} does not hold InceptionV3 weights ({str(exc).splitlines()[0]}).") from exc
    model = model.to(device)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device))[0]

    return Extractor("inception-v3-compat (torch-fidelity)", fn, 2048, "rgb",
                     {"file": str(path), "sha256": file_sha256(path), "resize": "TF-compatible bilinear to 299"})


def torchscript_extractor(path: str | Path | None, device: str | torch.device = "cpu") -> Extractor:
    """A TorchScript feature network (uint8 (B, 3, H, W) -> (B, D)) from a local file."""
    path = _existing(path, "The feature extractor needs a TorchScript file; pass --features PATH.")
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        raise WadiInputError(f"{path} is not a TorchScript module ({str(exc).splitlines()[0]}).") from exc
    try:
        with torch.no_grad():
            probe = module(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever the network raises, it does not take the protocol's input
        raise WadiInputError(f"{path} fails on a uint8 image batch (B, 3, H, W) ({str(exc).strip().splitlines()[-1][:160]}); "
                             "a feature network must take uint8 images and return (batch, features).") from exc
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise WadiInputError(f"{path} returns features of shape {shape}; it must return (batch, features).")

    def fn(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device))

    return Extractor(f"torchscript:{path.name}", fn, int(probe.shape[1]), "rgb",
                     {"file": str(path), "sha256": file_sha256(path)})


def digits_extractor(device: str | torch.device = "cpu") -> Extractor:
    """The shipped digit classifier (64-d penultimate features) for 8×8 digits in [-1, 1]."""
    from wadi_distill.builtin.digits.classifier import CLASSIFIER_FILE, shipped_classifier

    classifier = shipped_classifier(device)
    weights = Path(__file__).resolve().parents[1] / "builtin" / "digits" / CLASSIFIER_FILE
    return Extractor("builtin digit classifier", classifier.embed, classifier.feature_dim, "digits",
                     {"file": str(weights), "sha256": file_sha256(weights)})
