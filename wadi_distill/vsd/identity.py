"""A run's identity: what decides the training, hashed the same way in every process and on every machine.

The parts are the teacher's architecture (its config in canonical form, see
:func:`wadi_distill.teachers.pipeline.canonical_config`), the teacher's weights, the student kind and plan, the
fake score's adapter, the prompts and the batch (per process and number of processes: together they fix the
random stream). Paths, hash seeds and dict orders play no part, so a resume in a new process, with the teacher
named by another path, finds the same id; a refused resume names the parts that differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

PART_NAMES = {
    "teacher": "the teacher's architecture (its config)",
    "weights": "the teacher's weights",
    "student": "the student kind",
    "plan": "the student's layers and ranks (plan)",
    "fake": "the fake score's adapter",
    "prompts": "the prompts",
    "batch": "the batch (per process x processes)",
}


def stable_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of ``obj`` as sorted-key JSON: identical in every process whatever PYTHONHASHSEED is."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class RunIdentity:
    """The parts that decide a run (each a JSON-able value) and their hash, the run id."""

    parts: dict[str, Any]

    @property
    def run_id(self) -> str:
        return stable_hash(self.parts)

    def differences(self, other: dict[str, Any] | None) -> list[str]:
        """Plain names of the parts in which ``other`` (a checkpoint's recorded parts) differs from this run."""
        if not other:
            return []
        found = []
        for key in PART_NAMES:
            if self.parts.get(key) == other.get(key):
                continue
            if key == "batch" and isinstance(other.get(key), dict):  # say the numbers: a GPU count is easy to fix
                was, now = other[key], self.parts[key]
                found.append(f"the batch ({was.get('per_process')} per process x {was.get('processes')} processes "
                             f"then, {now['per_process']} x {now['processes']} now)")
            else:
                found.append(PART_NAMES.get(key, key))
        return found

    def refusal(self, where: str, other: dict[str, Any] | None) -> str:
        """The sentence that refuses resuming the checkpoint at ``where`` whose recorded parts are ``other``."""
        diffs = self.differences(other)
        if not diffs:
            what = "another teacher, plan, prompts or batch size (it records no details)"
        else:
            what = ", ".join(diffs)
        return (f"The checkpoint {where} was written by another run ({what} differ); resume it with the "
                "options it was trained with, or start a new run in another output folder.")


def identity_for(*, teacher_fingerprint: str, weights_digest: str, student: str, plan_ranks: dict | None,
                 fake_kind: str, fake_ranks: dict, prompts_key: str, batch_size: int,
                 processes: int) -> RunIdentity:
    """Build the :class:`RunIdentity` of a run from its already canonical ingredients."""
    return RunIdentity({
        "teacher": teacher_fingerprint, "weights": weights_digest, "student": student, "plan": plan_ranks,
        "fake": {"kind": fake_kind, "ranks": fake_ranks}, "prompts": prompts_key,
        "batch": {"per_process": int(batch_size), "processes": int(processes)},
    })
