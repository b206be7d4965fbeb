"""Metrics against known answers, and the sanity ordering of the shipped teacher on a small sample."""

import numpy as np
import pytest
import torch

from wadi_distill.builtin.digits.data import load_split
from wadi_distill.evaluate import (
    class_accuracy, evaluate_images, frechet_distance, frechet_distance_from_stats, precision_recall,
)
from wadi_distill.digits_demo.sanity import class_mean_images, gaussian_blur, ordering_violations, sanity_rows
from wadi_probe.errors import WadiInputError


def test_identical_sets_have_zero_frechet_distance():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_one_dimensional_gaussians_give_the_closed_form():
    # FD(N(0, 1), N(m, s^2)) = m^2 + (1 - s)^2
    assert frechet_distance_from_stats(np.zeros(1), np.eye(1), np.array([3.0]), 4.0 * np.eye(1)) == pytest.approx(9.0 + 1.0)


def test_non_commuting_covariances_match_the_matrix_square_root_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_samples_of_shifted_gaussians_approach_the_analytic_distance():
    g = torch.Generator().manual_seed(2)
    n, d = 20000, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 1.0
    # mean shift 3 * 1^2 = 3; per axis (1 - s)^2 = 0, 1, 0.25
    assert frechet_distance(a, b) == pytest.approx(3.0 + 1.0 + 0.25, rel=0.03)


def test_frechet_distance_refuses_bad_input():
    with pytest.raises(WadiInputError, match="different widths"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(WadiInputError, match="NaN"):
        frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))


def test_precision_recall_known_cases():
    real = torch.arange(20, dtype=torch.float64)[:, None]
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    # four fakes at 0..3: all lie on the real manifold; their k=3 balls cover real points 0..6 only (7 of 20)
    precision, recall = precision_recall(real, torch.tensor([[0.0], [1.0], [2.0], [3.0]]), k=3)
    assert precision == 1.0 and recall == pytest.approx(7 / 20)
    # fakes far away: neither realistic nor covering
    assert precision_recall(real, torch.arange(100, 110, dtype=torch.float64)[:, None], k=3) == (0.0, 0.0)
    # real radii: 2 inside, 3 at the ends -> 5.5 is inside, 23 (3 past the last point 19... 4 away) is not
    precision, _ = precision_recall(real, torch.tensor([[5.5], [23.0], [21.5], [300.0]]), k=3)
    assert precision == pytest.approx(2 / 4)
    with pytest.raises(WadiInputError, match="k = 5"):
        precision_recall(real, real[:4], k=5)


def test_shipped_classifier_recognises_held_out_digits():
    test = load_split("test")
    assert class_accuracy(test.images, test.labels) >= 0.95
    assert class_accuracy(test.images, (test.labels + 1) % 10) <= 0.1


def test_evaluate_images_on_real_digits_and_bad_shapes():
    test = load_split("test")
    metrics = evaluate_images(test.images, test.labels)
    assert set(metrics) >= {"fd_pixel", "fd_features", "precision", "recall", "class_accuracy"}
    assert metrics["precision"] > 0.85 and metrics["recall"] > 0.85
    again = evaluate_images(test.images, test.labels)
    assert again == metrics  # the classifier is deterministic
    with pytest.raises(WadiInputError, match="cannot be compared"):
        evaluate_images(torch.zeros(10, 1, 16, 16))


def test_blur_and_class_means_are_far_from_real_digits():
    test = load_split("test")
    real = evaluate_images(test.images, test.labels)
    for degraded in (gaussian_blur(test.images, 1.0), class_mean_images(test.labels)):
        bad = evaluate_images(degraded, test.labels)
        assert bad["fd_pixel"] > 3 * real["fd_pixel"]
        assert bad["fd_features"] > 3 * real["fd_features"]
        assert bad["recall"] < real["recall"] - 0.3


def test_gaussian_blur_keeps_constant_images_and_mass():
    flat = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)


@pytest.mark.slow
def test_sanity_ordering_of_the_shipped_teacher_on_a_small_sample():
    from wadi_distill.builtin.digits.model import load_builtin

    rows = sanity_rows(load_builtin("digits"), steps=15, cfg=2.0, seed=0, count=100)
    assert ordering_violations(rows) == []
    real, teacher = rows[0], rows[1]
    assert teacher["class_accuracy"] >= 0.9
    assert teacher["fd_features"] < 3 * real["fd_features"]


def test_classifier_training_and_save_load_round_trip(tmp_path):
    from wadi_distill.builtin.digits.classifier import load_classifier, save_classifier, train_classifier

    train, test = load_split("train"), load_split("test")
    model = train_classifier(train.images[:400], train.labels[:400], epochs=15, seed=1)
    assert class_accuracy(test.images, test.labels, model) > 0.5
    save_classifier(model, tmp_path, {"seed": 1})
    loaded = load_classifier(tmp_path)
    assert torch.equal(loaded.embed(test.images), model.embed(test.images))
    with pytest.raises(WadiInputError, match="No digit classifier"):
        load_classifier(tmp_path / "missing")
    with pytest.raises(WadiInputError, match=r"\(N, 1, 8, 8\)"):
        model.features(torch.zeros(2, 1, 16, 16))
