"""Teachers: loading a local diffusers pipeline folder (or the built-in world) as a :class:`Teacher`.

:func:`load_teacher` asks the registered families (:mod:`wadi_distill.teachers.families`) which one the folder
belongs to, by ``model_index.json``'s pipeline class (or, for the built-in world, by its name), and lets that
family load it. Nothing is fetched from a hub: every component is read with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from wadi_distill.teachers import families as _families  # noqa: F401  (registers the families)
from wadi_distill.teachers.components import read_model_index
from wadi_distill.teachers.conditioning import Conditioning
from wadi_distill.teachers.teacher import (TEACHER_FAMILIES, Teacher, TeacherFamily, TextEncoders, canonical_config,
                                           family_for_pipeline)

__all__ = ["load_teacher", "Conditioning", "Teacher", "TeacherFamily", "TextEncoders", "TEACHER_FAMILIES",
           "canonical_config"]


@contextlib.contextmanager
def _library_bars(enabled: bool) -> Iterator[None]:
    """transformers' and diffusers' own loading bars ("Loading weights", "Loading checkpoint shards") on or off for
    the duration, restored afterwards (they are process-wide switches of those libraries)."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in before:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in before:
            if was:
                lib.enable_progress_bar()


def load_teacher(path: str | Path, *, load_text_encoders: bool = True, load_vae: bool = True,
                 text_encoder_dtype: torch.dtype | None = None, progress: bool = True) -> Teacher:
    """Load a local diffusers pipeline folder (or ``builtin:NAME``) as a :class:`Teacher`, without network.

    Supported: every registered family's pipeline classes (StableDiffusionPipeline for SD1.x and SD2.x incl.
    v-prediction, StableDiffusionXLPipeline, PixArtAlphaPipeline / PixArtSigmaPipeline) and the built-in world; any
    other pipeline class is refused with a clear message. ``text_encoder_dtype`` loads the text encoders in half
    precision (T5-XXL is 19 GB in fp32; a family may replace the dtype, PixArt's T5 takes bf16 for fp16).
    ``progress=False`` silences the loading bars transformers and diffusers print themselves.
    """
    with _library_bars(progress):
        return _load_teacher(str(path), load_text_encoders=load_text_encoders, load_vae=load_vae,
                             text_encoder_dtype=text_encoder_dtype)


def _load_teacher(spec: str, **options) -> Teacher:
    """The registered family that claims ``spec`` (a built-in name, or a folder's pipeline class) loads it."""
    for family in TEACHER_FAMILIES.values():
        if family.claims_source(spec):
            return family.load(spec, **options)
    root = Path(spec)
    index = read_model_index(root)
    family = family_for_pipeline(index.get("_class_name", ""), root)
    return family.load(spec, index, **options)
