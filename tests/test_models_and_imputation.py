"""Model sizes, the deficit rule and batched generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedaug_flwr.imputation import generate, minority_counts, synthetic_labels
from fedaug_flwr.models import CVAE, ExquisiteNetV1, count_parameters, cvae_loss


def test_parameter_counts_match_the_study():
    assert count_parameters(CVAE(latent_dim=3)) == 1_072_150
    assert count_parameters(ExquisiteNetV1()) == 927_254


def test_shapes():
    images = torch.rand(4, 1, 28, 28).round()
    labels = torch.tensor([0, 3, 9, 1])
    assert ExquisiteNetV1()(images).shape == (4, 10)
    reconstruction, mean, scale = CVAE()(images, labels)
    assert reconstruction.shape == (4, 1, 28, 28) and mean.shape == scale.shape == (4, 3)
    assert (scale > 0).all()
    for recon in ("bce", "sse"):
        assert torch.isfinite(cvae_loss(CVAE(), images, labels, 0.5, recon))


def test_deficit_rule():
    counts = [50, 10, 0, 50, 40, 25, 50, 5, 30, 45]
    k = 500
    plan = minority_counts(counts, k)
    deficit = np.max(counts) - np.array(counts)
    assert plan.tolist() == np.rint(k * deficit / deficit.sum()).astype(int).tolist()
    assert abs(int(plan.sum()) - k) <= 5
    assert plan[0] == plan[3] == plan[6] == 0  # majority labels get none
    assert plan[2] == plan.max()  # the missing label gets most


def test_balanced_client_gets_a_uniform_draw_not_a_division_by_zero():
    assert minority_counts([7] * 10, 100) is None
    labels = synthetic_labels("minority", 100, [7] * 10, np.random.default_rng(0))
    assert len(labels) == 100 and len(set(labels.tolist())) > 5


def test_uniform_and_none_plans():
    rng = np.random.default_rng(0)
    uniform = synthetic_labels("uniform", 1000, [100] + [0] * 9, rng)
    assert len(uniform) == 1000 and np.bincount(uniform, minlength=10).min() > 60
    assert len(synthetic_labels("none", 1000, [1] * 10, rng)) == 0
    with pytest.raises(ValueError, match="unknown imputation"):
        synthetic_labels("majority", 10, [1] * 10, rng)


def test_generation_is_batched_binarized_and_seeded():
    cvae = CVAE()
    labels = np.repeat(np.arange(10), 30)
    images = generate(cvae, labels, seed=1, batch_size=128)
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(images)) <= {0, 1}
    assert np.array_equal(images, generate(cvae, labels, seed=1, batch_size=128))
    assert not np.array_equal(images, generate(cvae, labels, seed=2, batch_size=128))


def test_generation_calls_the_decoder_once_per_batch(monkeypatch):
    cvae = CVAE()
    calls = []
    original = cvae.decode
    monkeypatch.setattr(cvae, "decode", lambda z, y: calls.append(len(y)) or original(z, y))
    generate(cvae, np.zeros(1000, dtype=np.int64), seed=0, batch_size=400)
    assert calls == [400, 400, 200]
