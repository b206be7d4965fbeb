"""Scoring one-step students the way papers report them: FID, KID, precision/recall, CLIP score (see protocol)."""

from wadi_distill.evaluation.clip import ClipScorer, clip_scores
from wadi_distill.evaluation.features import (
    INCEPTION_FILE, INCEPTION_RESIZES, Extractor, digits_extractor, file_sha256, inception_extractor,
    inception_file_kind, shipped_inception_file, torchscript_extractor,
)
from wadi_distill.evaluation.images import list_images, protocol_image, save_pngs
from wadi_distill.evaluation.inputs import (
    check_generation, clip_scorer, generate_for_evaluation, reference_and_extractor, save_reference_folder_stats,
)
from wadi_distill.evaluation.kid import kernel_inception_distance
from wadi_distill.evaluation.protocol import (
    DIGITS_REFERENCE, EvalSettings, evaluate, generate_images, save_reference_stats,
)

__all__ = [
    "ClipScorer", "clip_scores", "INCEPTION_FILE", "INCEPTION_RESIZES", "Extractor", "digits_extractor", "file_sha256",
    "inception_extractor", "inception_file_kind", "shipped_inception_file", "torchscript_extractor", "list_images",
    "protocol_image", "save_pngs", "kernel_inception_distance",
    "DIGITS_REFERENCE", "EvalSettings", "evaluate", "generate_images", "save_reference_stats",
    "reference_and_extractor", "save_reference_folder_stats", "clip_scorer", "check_generation", "generate_for_evaluation",
]
