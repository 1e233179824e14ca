"""Generator quality: Fréchet distance, coverage, the real-image reference, and what a run
records (the quick check with its reference, the pretrained model's own scores, and every
classification metric in every place of summary.json)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedaug_flwr import pretrain, server_work
from fedaug_flwr.data import Digits, load_source
from fedaug_flwr.fidelity import (
    coverage,
    frechet_distance,
    frechet_distance_of_moments,
    per_class_coverage,
    pooled_features,
)
from fedaug_flwr.metrics import METRIC_NAMES
from fedaug_flwr.models import ExquisiteNetV1
from fedaug_flwr.pretrain import proportional_counts
from fedaug_flwr.quality import fidelity_sample, label_matched_sample
from tests.conftest import TINY
from tests.test_simulation import run_in_process

# ------------------------------------------------------------------ Fréchet distance


@pytest.mark.filterwarnings("error")  # a singular covariance product must be handled, not warned
def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(400, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    # fewer points than dimensions and dead (constant) channels: singular covariances
    wide = np.random.default_rng(1).normal(size=(50, 80))
    wide[:, :30] = 0.0
    assert frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    # Diagonal covariances: sum over axes of (m_a - m_b)^2 + (s_a - s_b)^2.
    # |(0,0) - (3,4)|^2 = 25; stds 1 vs 2 and 2 vs 3 add 1 + 1.
    assert frechet_distance_of_moments(
        np.zeros(2), np.diag([1.0, 4.0]), np.array([3.0, 4.0]), np.diag([4.0, 9.0])
    ) == pytest.approx(27.0)
    # I against [[2, 1], [1, 2]] (eigenvalues 3 and 1, so tr sqrt = sqrt(3) + 1), means
    # 0 and (1, 2): 5 + tr(I) + tr(S) - 2 (sqrt(3) + 1) = 5 + 2 + 4 - 2 sqrt(3) - 2.
    assert frechet_distance_of_moments(
        np.zeros(2), np.eye(2), np.array([1.0, 2.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    ) == pytest.approx(9.0 - 2.0 * np.sqrt(3.0))
    # ...and from samples of those Gaussians, up to sampling error
    rng = np.random.default_rng(2)
    a = rng.multivariate_normal([0.0, 0.0], np.diag([1.0, 4.0]), size=100_000)
    b = rng.multivariate_normal([3.0, 4.0], np.diag([4.0, 9.0]), size=100_000)
    assert frechet_distance(a, b) == pytest.approx(27.0, rel=0.01)


# ------------------------------------------------------------------ coverage


def test_coverage_is_one_for_the_real_set_itself_and_zero_far_away():
    real = np.random.default_rng(3).normal(size=(200, 5))
    assert coverage(real, real) == 1.0
    assert coverage(real, real + 100.0) == 0.0
    # half of the real points copied: at least those are covered
    assert coverage(real, real[:100]) >= 0.5


def test_coverage_uses_the_kth_neighbour_and_an_open_ball():
    real = np.arange(10.0)[:, None]  # the digits 0..9 on a line
    # Real 9's 5th nearest real neighbour is 4 (radius 5); real 8's is 4 (radius 4): a
    # synthetic point at 12 lies inside 9's ball and on the edge of 8's, which does not count.
    assert coverage(real, np.array([[12.0]])) == pytest.approx(0.1)
    # at 13.5 it is 4.5 from 9: inside a radius of 5 (k=5), outside the 4 of k=4
    assert coverage(real, np.array([[13.5]])) == pytest.approx(0.1)
    assert coverage(real, np.array([[13.5]]), k=4) == 0.0


def test_coverage_is_measured_per_class():
    labels = np.repeat(np.arange(10), 10)
    real = np.random.default_rng(4).normal(size=(100, 3)) + 100.0 * labels[:, None]
    synthetic = real.copy()
    synthetic[labels == 3] += 100.0  # class 3 generated far from its real images
    per_class = per_class_coverage(real, labels, synthetic, labels)
    assert per_class == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # synthetic images lying on a class's real ones but labelled otherwise do not cover it
    assert per_class_coverage(real, labels, real, (labels + 1) % 10) == [0.0] * 10
    # a class with at most k real points has no coverage
    assert per_class_coverage(real[:95], labels[:95], real, labels)[9] is None


# ------------------------------------------------------------------ samples and features


def _digits(labels: list[int]) -> Digits:
    """Images that differ from each other: the first row spells the image's index in binary."""
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, :] = (np.arange(len(labels))[:, None] >> np.arange(28)) & 1
    return Digits(images, np.asarray(labels, dtype=np.int64))


def _distinct(digits: Digits) -> int:
    return len({image.tobytes() for image in digits.images})


def test_label_matched_sample_has_the_counts_and_repeats_only_when_short():
    pool = _digits([0] * 50 + [1] * 3 + [2] * 20)
    sample, repeats = label_matched_sample(pool, [10, 5, 0] + [0] * 7, np.random.default_rng(0))
    assert sample.label_counts() == [10, 5, 0] + [0] * 7
    assert repeats == 2  # label 1: all 3 pool images, then 2 repeats
    assert _distinct(sample) == 15 - 2
    again, _ = label_matched_sample(pool, [10, 5, 0] + [0] * 7, np.random.default_rng(0))
    assert np.array_equal(again.labels, sample.labels)  # the seed decides
    plenty, none = label_matched_sample(pool, [20, 0, 20] + [0] * 7, np.random.default_rng(1))
    assert none == 0 and plenty.label_counts()[:3] == [20, 0, 20]
    assert _distinct(plenty) == 40  # drawn without replacement while the pool has enough


def test_fidelity_sample_keeps_the_test_sets_label_counts():
    test = _digits([label for label in range(10) for _ in range(7 + label)])
    sample = fidelity_sample(test, np.random.default_rng(0))
    assert sample.label_counts() == test.label_counts()
    assert _distinct(sample) == len(test)


def test_pooled_features_are_what_the_linear_layer_sees():
    torch.manual_seed(0)
    model = ExquisiteNetV1().eval()
    digits = _digits(list(range(10)) * 3)
    features = pooled_features(model, digits, batch_size=8)
    assert features.shape == (30, 640)
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    with torch.no_grad():
        logits = model(images)
        from_features = model.head[-1](torch.from_numpy(features).float())
    assert torch.allclose(from_features, logits, atol=1e-4)


# ------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """One in-process run with pretraining, recording every training of a classifier on
    synthetic or reference images."""
    calls = []
    real_training = server_work.train_on_synthetic

    def recorded(train_set, *args, **kwargs):
        calls.append((train_set, args, kwargs))
        return real_training(train_set, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server_work, "train_on_synthetic", recorded)
            folder = tmp_path_factory.mktemp("quality")
            summary = run_in_process(folder, "run", seed=3, pretrain="federated")
    finally:
        torch.set_num_threads(threads)
    return folder / "run", summary, calls


def test_reference_has_the_same_budget_on_real_pool_images(finetune_run):
    _, summary, calls = finetune_run
    # pretraining first, then the quick check: synthetic, then reference
    (synthetic, synthetic_args, synthetic_kwargs), (real, real_args, real_kwargs) = calls[-2:]
    assert real_args == synthetic_args and real_kwargs == synthetic_kwargs == {}
    assert len(real) == len(synthetic) == TINY["quality-samples"] * 6 // 7
    assert real.label_counts() == synthetic.label_counts() == proportional_counts(len(real))
    pool = {image.tobytes() for image in load_source("mnist-5k", "").pool.images}
    assert all(image.tobytes() in pool for image in real.images)
    assert _distinct(real) == len(real)
    reference = summary["generator-quality"]["reference"]
    assert reference["label-counts-train"] == real.label_counts()
    assert reference["repeated-images"] == 0  # mnist-5k has 400 images per label


def test_generator_quality_has_reference_gap_and_fidelity(finetune_run):
    output, summary, _ = finetune_run
    quality = summary["generator-quality"]
    assert "quality-samples" in quality["classifier"]
    assert "real deployment would not have them" in quality["note"]
    reference = quality["reference"]
    for metric in ("accuracy", "macro-f1"):
        expected = reference["real-test"][metric] - quality["real-test"][metric]
        assert quality["gap"][metric] == pytest.approx(expected)
    test_size = summary["data"]["global-test-size"]
    assert sum(reference["real-test"]["histogram-max-probability"]) == test_size
    fidelity = quality["fidelity"]
    assert fidelity["real-images"] == fidelity["synthetic-images"] == test_size == 1000
    assert fidelity["label-counts"] == [100] * 10
    assert np.isfinite(fidelity["frechet-distance"]) and fidelity["frechet-distance"] > 0
    assert len(fidelity["coverage-per-class"]) == 10
    assert fidelity["coverage"] == pytest.approx(np.mean(fidelity["coverage-per-class"]))
    assert (output / summary["artifacts"]["probability-histograms"]).stat().st_size > 0


def test_pretrained_models_own_scores_stay_under_pretraining(finetune_run):
    output, summary, _ = finetune_run
    quality = summary["pretraining"]["quality"]
    assert "pretrained" in quality["classifier"]
    for split, size in (("real-test", summary["data"]["global-test-size"]), ("synthetic-test", 20)):
        scores = quality[split]
        assert len(scores["per-class-accuracy"]) == len(scores["per-class-f1"]) == 10
        assert sum(scores["histogram-max-probability"]) == size
    histograms = summary["artifacts"]["pretrained-probability-histograms"]
    assert histograms != summary["artifacts"]["probability-histograms"]
    assert (output / histograms).stat().st_size > 0


def test_every_classification_metric_reaches_the_summary(finetune_run):
    _, summary, _ = finetune_run
    last = summary["classifier"]["rounds"][-1]
    weighted = [f"{name}-weighted" for name in METRIC_NAMES]
    places = {
        "rounds[-1].global-test": last["global-test"],
        "rounds[-1].evaluate": last["evaluate"],
        "final.global-test": summary["final"]["global-test"],
        "final.clients": summary["final"]["clients"],
        "pretraining.pretrained.global-test": summary["pretraining"]["pretrained"]["global-test"],
        **{f"evaluate-per-client[{i}]": c for i, c in enumerate(last["evaluate-per-client"])},
        **{f"clients[{i}].final-test": c["final-test"] for i, c in enumerate(summary["clients"])},
    }
    for place, metrics in places.items():
        assert set(METRIC_NAMES) <= set(metrics), place
    for place in ("rounds[-1].evaluate", "final.clients"):
        assert set(weighted) <= set(places[place]), place


def test_a_classifier_trained_on_the_server_depends_on_its_seed_and_images_alone():
    """The generator-quality check's reference must be the same for a seed whichever CVAE
    ran before it: dropout draws from torch's global generator, which the process's
    earlier work moves."""
    rng = np.random.default_rng(0)
    images = Digits((rng.random((64, 28, 28)) > 0.5).astype(np.uint8), np.arange(64) % 10)

    def weights() -> list[torch.Tensor]:
        model = pretrain.train_on_synthetic(images, 1, 0.01, 0.0, 16, seed=3)
        return [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    first = weights()
    torch.rand(1000)  # whatever ran before in the process
    second = weights()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
