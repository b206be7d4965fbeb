"""The inputs of one evaluation, checked before any time is spent: reference, feature extractor, CLIP scorer, images.

``wadi-distill evaluate`` calls these in order and only prints what they return; a notebook can call them the
same way. Each refuses a bad combination of inputs with one sentence (a :class:`WadiInputError`) before the slow
step it guards: loading networks, extracting reference features, generating images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wadi_distill.evaluation.clip import ClipScorer
from wadi_distill.evaluation.features import (
    Extractor, digits_extractor, file_sha256, inception_extractor, torchscript_extractor,
)
from wadi_distill.evaluation.images import list_images
from wadi_distill.evaluation.protocol import DIGITS_REFERENCE, EvalSettings, generate_images, save_reference_stats
from wadi_probe.errors import WadiInputError

__all__ = ["reference_and_extractor", "save_reference_folder_stats", "clip_scorer", "check_generation",
           "generate_for_evaluation"]


def reference_and_extractor(reference: str | None, teacher: str | None, inception: str | Path | None,
                            features: str | Path | None, device: str,
                            inception_resize: str = "clean") -> tuple[str, bool, Extractor]:
    """(reference, whether it is ``builtin:digits``, the feature extractor for it).

    Without ``reference`` only the ``builtin:digits`` teacher has one (its held-out digits). Digits are scored with
    the shipped classifier's features; otherwise a TorchScript ``features`` network or the local Inception weights,
    resized to 299 by ``inception_resize`` (``"clean"``: clean-fid's, ``"tf1"``: the original FID code's).
    """
    if reference is None:
        if teacher != DIGITS_REFERENCE:
            raise WadiInputError("give --reference: a folder of real images, a statistics .npz, or builtin:digits.")
        reference = DIGITS_REFERENCE
    digits = reference == DIGITS_REFERENCE
    if inception is not None and features is not None:
        raise WadiInputError("give one of --inception and --features, not both.")
    if digits:
        extractor = digits_extractor(device)
    elif features is not None:
        extractor = torchscript_extractor(features, device)
    else:
        extractor = inception_extractor(inception, device, inception_resize)
    if not digits and not Path(reference).expanduser().exists():
        raise WadiInputError(f"the reference {reference} does not exist.")
    return reference, digits, extractor


def save_reference_folder_stats(reference: str, output: str | Path, extractor: Extractor, settings: EvalSettings,
                                digits: bool) -> dict[str, Any]:
    """:func:`save_reference_stats` for a reference image folder; a statistics file or builtin:digits is refused."""
    if digits or Path(reference).suffix == ".npz":
        raise WadiInputError("--save-reference-stats needs a reference image folder.")
    return save_reference_stats(reference, output, extractor, settings)


def clip_scorer(clip: str | Path | None, digits: bool, device: str) -> ClipScorer | None:
    """The CLIP scorer of a local model folder, or None without one; builtin:digits has no CLIP score."""
    if clip is None:
        return None
    if digits:
        raise WadiInputError("builtin:digits has no CLIP score; its prompts are scored by class accuracy.")
    return ClipScorer(clip, device)


def check_generation(images: str | Path | None, teacher: str | None, prompts: list[str] | None, reference: str,
                     digits: bool, k: int | None = None) -> None:
    """Refuse, before generating or writing statistics: both or neither of a folder and a teacher, no prompts, fewer
    prompts than the metrics' k + 1 images, a reference smaller than the set to score.

    FID against a reference smaller than the generated set measures the reference's own sampling noise.
    """
    if (images is None) == (teacher is None):
        raise WadiInputError("give either --images (a folder to score) or --teacher with --adapter/--merged and --prompts.")
    if teacher is None:
        if not digits and Path(reference).is_dir() and Path(images).is_dir():
            count, scored = len(list_images(reference, "reference folder")), len(list_images(images, "image folder"))
            if count < scored:
                raise WadiInputError(f"the reference folder {reference} has {count} images, fewer than the {scored} "
                                     "to score; FID against a smaller reference measures the reference's own sampling noise.")
        return
    if prompts is None:
        raise WadiInputError("generating images needs --prompts (one prompt per line).")
    if k is not None and len(prompts) < k + 1:
        raise WadiInputError(f"the prompt file gives {len(prompts)} images; the metrics need at least {k + 1} "
                             f"(k = {k}).")
    if not digits and Path(reference).is_dir():
        count = len(list_images(reference, "reference folder"))
        if count < len(prompts):
            raise WadiInputError(f"the reference folder {reference} has {count} images, fewer than the "
                                 f"{len(prompts)} to generate; FID against a smaller reference measures the "
                                 "reference's own sampling noise.")


def generate_for_evaluation(teacher: str, prompts: list[str], folder: str | Path, *, prompts_file: str | Path | None,
                            adapter: str | Path | None, merged: str | Path | None, seed: int, batch_size: int,
                            device: str, max_hours: float | None = None) -> dict[str, Any]:
    """:func:`generate_images`' record, with the prompt file's path and SHA-256 so the record names its prompts."""
    generation = generate_images(teacher, prompts, folder, adapter=adapter, merged=merged, seed=seed,
                                 batch_size=batch_size, device=device, max_hours=max_hours)
    if prompts_file is not None:
        generation["prompts"] = {"file": str(prompts_file), "sha256": file_sha256(prompts_file)}
    return generation
