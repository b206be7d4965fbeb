"""``benchmarks/digits_study.py`` and its report: the chance student, the rules the verdicts follow, and the claim
the study's reuse of runs rests on (the first N steps of a longer run are an N-step run)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import digits_study  # noqa: E402
import digits_study_report as report  # noqa: E402


def test_structureless_student_matches_each_matrix_change_norm_and_keeps_vectors():
    gen = torch.Generator().manual_seed(0)
    teacher = {"w": torch.randn(64, 32, generator=gen), "conv": torch.randn(8, 4, 3, 3, generator=gen),
               "b": torch.randn(64, generator=gen)}
    student = {"w": teacher["w"] + 0.01 * torch.randn(64, 32, generator=gen),
               "conv": teacher["conv"] + 0.2 * torch.randn(8, 4, 3, 3, generator=gen),
               "b": teacher["b"] + 1.0}
    chance = digits_study.structureless_student(teacher, student, seed=3)
    for name in ("w", "conv"):
        assert torch.allclose((chance[name] - teacher[name]).norm(), (student[name] - teacher[name]).norm(), rtol=1e-5)
        assert not torch.allclose(chance[name], student[name])
    assert torch.equal(chance["b"], student["b"])
    again = digits_study.structureless_student(teacher, student, seed=3)
    assert all(torch.equal(chance[k], again[k]) for k in chance)


def test_structureless_change_reads_as_mostly_sideways_in_the_probe():
    """The chance the study compares the students with: a random change of rows of d inputs turns them about
    sqrt(pi d / 2) times more (in radians) than it rescales them (first order in the change's size)."""
    from wadi_probe.analyze import compare

    gen = torch.Generator().manual_seed(1)
    teacher = {f"layer{i}.weight": torch.randn(256, 64, generator=gen) for i in range(4)}
    student = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    chance = digits_study.structureless_student(teacher, student, seed=0)
    ratio = compare(teacher, chance, device="cpu", spectra=False).summary["angle_to_norm_ratio"]
    assert ratio == pytest.approx(math.sqrt(math.pi * 64 / 2), rel=0.1)


def _entry(values):
    return report.stats(values)


def test_exceeds_is_twice_the_standard_error_of_the_difference():
    a, b = _entry([10.0, 12.0, 14.0]), _entry([4.0, 6.0, 8.0])  # std 2 each, n 3: se = sqrt(8/3) = 1.633
    diff, se, out = report.exceeds(a, b)
    assert diff == 6.0 and se == pytest.approx(math.sqrt(8 / 3)) and out
    assert not report.exceeds(_entry([10.0, 12.0, 14.0]), _entry([8.0, 10.0, 12.0]))[2]  # 2 < 2·1.633


def _sweep_rows(best_fake: int) -> list[dict]:
    rows = []
    for job in digits_study.sweep_jobs():
        fd = 50.0 if job.fake_updates == best_fake else 60.0 + job.lr
        rows.append({"phase": "sweep", "method": job.method, "steps": 800, "lr": job.lr,
                     "fake_updates": job.fake_updates, "fd_features": fd})
    return rows


def test_the_sweep_keeps_the_lowest_feature_fd_and_refuses_an_unfinished_sweep():
    chosen = digits_study.chosen_settings(_sweep_rows(best_fake=5))
    assert chosen["full"] == (2e-5, 5) and chosen["lorad-probe"] == (1e-3, 5)
    with pytest.raises(SystemExit, match="not finished"):
        digits_study.chosen_settings(_sweep_rows(best_fake=5)[:-1])


def _probe_entry(ratio: float, spread: float = 0.1) -> dict:
    values = {"angle_to_norm_ratio": [ratio - spread, ratio, ratio + spread],
              "paper_direction_to_norm_ratio": [0.06] * 3, "angle_deg_mean": [0.6] * 3,
              "norm_change_mean": [0.001] * 3}
    return {k: _entry(v) for k, v in values.items()}


def test_direction_verdict_follows_from_the_chance_comparison():
    _, verdict = report.finding_direction(_probe_entry(9.0), _probe_entry(9.0))
    assert verdict.startswith("**Cannot tell at this size:**")
    _, verdict = report.finding_direction(_probe_entry(20.0), _probe_entry(9.0))
    assert verdict.startswith("**Reproduces:**")
    _, verdict = report.finding_direction(_probe_entry(5.0), _probe_entry(9.0))
    assert verdict.startswith("**Reproduces in direction only, and less than chance:**")
    _, verdict = report.finding_direction(_probe_entry(0.5), _probe_entry(9.0))
    assert verdict.startswith("**Does not reproduce:**")


def test_rank_verdict_needs_an_inner_rank_better_than_both_ends_beyond_the_spread():
    def ranks(fds):
        return {str(r): {"fd_features": _entry([fd - 1, fd, fd + 1])} for r, fd in zip((4, 8, 32, 64), fds)}

    assert report.finding_rank(ranks([60, 40, 45, 62])).startswith("**Reproduces:**")
    assert report.finding_rank(ranks([40, 50, 55, 60])).startswith("**Does not reproduce:**")
    assert report.finding_rank(ranks([50, 49.5, 50.5, 50])).startswith("**Cannot tell")


def test_first_steps_of_a_longer_run_are_the_shorter_run(tmp_path, monkeypatch):
    """The study takes a length run's 800-step point as the 800-step run of that seed; here at 3 of 6 steps, for
    a fully fine-tuned student with several fake updates and a PEFT student."""
    monkeypatch.setattr(digits_study, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(digits_study, "score_and_probe", lambda path, eval_seed=0: {
        "digest": digits_study_digest(path)})
    threads = torch.get_num_threads()  # run_job runs on one thread, as the study does
    try:
        for method, fake in (("full", 2), ("dora-peft", 1)):
            digits_study.run_job(digits_study.Job("t", method, 0, digits_study.BASE_LR[method], fake, (3, 6)))
            digits_study.run_job(digits_study.Job("u", method, 0, digits_study.BASE_LR[method], fake, (3,)))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for method in ("full", "dora-peft"):
        long3 = next(r for r in rows if r["phase"] == "t" and r["method"] == method and r["steps"] == 3)
        long6 = next(r for r in rows if r["phase"] == "t" and r["method"] == method and r["steps"] == 6)
        short = next(r for r in rows if r["phase"] == "u" and r["method"] == method)
        assert long3["digest"] == short["digest"] != long6["digest"]


def digits_study_digest(path: Path) -> str:
    import hashlib

    from safetensors.torch import load_file

    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()
