"""Pair a teacher's and a student's tensors by normalised name (docs/design.md, "Checkpoints and names").

Two checkpoints in different layouts (an LDM single file and a diffusers folder, say) pair completely because
both are opened under the same diffusers-style names. Plainly different architectures are refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wadi_probe.io.checkpoints import Checkpoint, name_filter
from wadi_probe.errors import WadiInputError

#: fewer than this fraction of either checkpoint's (filtered) tensors matched means "mostly unmatched": refused
#: unless a partial comparison is asked for
MIN_MATCHED_FRACTION = 0.9


@dataclass
class Pairing:
    """Names in both (equal shapes, teacher order), names with different shapes, and names in only one."""

    matched: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    only_in_teacher: list[str] = field(default_factory=list)
    only_in_student: list[str] = field(default_factory=list)

    @property
    def unmatched(self) -> int:
        """Tensors that could not be compared (shape mismatches plus names in only one checkpoint)."""
        return len(self.shape_mismatch) + len(self.only_in_teacher) + len(self.only_in_student)

    def unmatched_names(self) -> list[str]:
        """Every tensor that could not be compared: shape mismatches, then teacher-only, then student-only names."""
        return [name for name, _, _ in self.shape_mismatch] + self.only_in_teacher + self.only_in_student

    def to_dict(self) -> dict:
        """The report.json form: counts for matched, lists for the rest."""
        return {
            "matched": len(self.matched),
            "shape_mismatch": [[name, list(t), list(s)] for name, t, s in self.shape_mismatch],
            "only_in_teacher": list(self.only_in_teacher),
            "only_in_student": list(self.only_in_student),
        }


def pair_checkpoints(
    teacher: Checkpoint,
    student: Checkpoint,
    *,
    include: str | None = None,
    exclude: str | None = None,
    min_matched_fraction: float = MIN_MATCHED_FRACTION,
    partial: bool = False,
) -> Pairing:
    """Pair tensors by name; ``include``/``exclude`` are regexes searched in the names.

    Raises :class:`WadiInputError` when fewer than ``min_matched_fraction`` of either checkpoint's selected
    tensors have a same-named, same-shaped partner (the two look like different architectures) — with
    ``partial`` only when nothing at all matched — or when the filters select nothing.
    """
    keep = name_filter(include, exclude)
    teacher_names = [name for name in teacher.names() if keep(name)]
    student_names = [name for name in student.names() if keep(name)]
    if not teacher_names:
        raise WadiInputError(
            f"no tensor of {teacher.path} is selected by the include/exclude patterns "
            f"(include={include!r}, exclude={exclude!r})."
        )
    student_set = set(student_names)
    pairing = Pairing()
    for name in teacher_names:
        if name not in student_set:
            pairing.only_in_teacher.append(name)
            continue
        t_shape, s_shape = tuple(teacher.shape(name)), tuple(student.shape(name))
        if t_shape == s_shape:
            pairing.matched.append(name)
        else:
            pairing.shape_mismatch.append((name, t_shape, s_shape))
    teacher_set = set(teacher_names)
    pairing.only_in_student = [name for name in student_names if name not in teacher_set]
    matched = len(pairing.matched)
    if not matched:
        raise WadiInputError(
            f"{teacher.path} and {student.path} share no same-named, same-shaped tensor: they are different "
            "architectures (or the include/exclude patterns leave nothing in common)."
        )
    needed = min_matched_fraction * max(len(teacher_names), len(student_names))
    if matched < needed and not partial:
        examples = ", ".join(pairing.unmatched_names()[:3])
        raise WadiInputError(
            f"{teacher.path} and {student.path} look like different architectures: only {matched} of the teacher's "
            f"{len(teacher_names)} and the student's {len(student_names)} tensors pair up (unmatched e.g. {examples}); "
            "pass --partial (partial=True) to compare the matched ones anyway."
        )
    return pairing
