"""The memorization audit and the membership attacks, on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedaug_flwr import privacy
from fedaug_flwr.data import Digits, load_mnist5k
from fedaug_flwr.models import CVAE, cvae_loss
from fedaug_flwr.training import TensorData, train


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tests share two cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool() -> Digits:
    return load_mnist5k().pool


def client(pool: Digits, seed: int, train_size: int = 400, heldout_size: int = 100):
    """A client's training and held-out images, and real digits neither contains."""
    order = np.random.default_rng(seed).permutation(len(pool))
    cut = train_size + heldout_size
    return (
        pool.subset(order[:train_size]),
        pool.subset(order[train_size:cut]),
        pool.subset(order[cut : cut + 300]),
    )


def audit(synthetic: Digits, train_set: Digits, heldout: Digits) -> dict:
    return privacy.memorization_audit(
        synthetic.images,
        synthetic.labels,
        train_set.images,
        train_set.labels,
        heldout.images,
        heldout.labels,
    )


def test_hamming_counts_differing_pixels():
    a = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=np.uint8)
    b = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=np.uint8)
    assert privacy.hamming(a, b).tolist() == [[0, 2, 2], [2, 4, 2]]


def test_grey_images_are_refused():
    with pytest.raises(ValueError, match="binarize"):
        privacy.binary_rows(np.full((2, 28, 28), 0.5))


def test_a_generator_that_returns_training_images_is_flagged(pool):
    train_set, heldout, _ = client(pool, seed=0)
    copies = train_set.subset(np.random.default_rng(1).choice(len(train_set), 200))
    report = audit(copies, train_set, heldout)
    assert report["synthetic-images"] == 200
    assert report["flagged-share"] == 1.0
    assert report["exact-copies"] == 200
    assert report["closest-train-distances"] == [0] * privacy.CLOSEST
    assert min(report["closest-heldout-distances"]) > 0
    assert report["closer-to-train-share"] == 1.0
    assert report["flagged-share-reference"] <= 0.06  # the held-out baseline: ~5 % by design
    assert sum(report["histogram-train"]) == 200 and report["histogram-train"][0] == 200
    # statistics only: no image, no index into the client's data
    assert all(not isinstance(v, np.ndarray) for v in report.values())


def test_a_generator_that_returns_noise_is_not_flagged(pool):
    train_set, heldout, _ = client(pool, seed=0)
    rng = np.random.default_rng(2)
    noise = Digits((rng.random((200, 28, 28)) < 0.13).astype(np.uint8), rng.integers(0, 10, 200))
    report = audit(noise, train_set, heldout)
    assert report["flagged-share"] < 0.05
    assert report["exact-copies"] == 0
    assert min(report["closest-train-distances"]) > 50


def test_fresh_real_digits_are_flagged_at_about_the_chance_rate(pool):
    """Digits the 'generator' never saw: over several clients the flagged share is near
    the 5 % of the held-out reference (one client alone varies a lot)."""
    reports = [
        audit(fresh, train_set, heldout)
        for train_set, heldout, fresh in (client(pool, seed) for seed in range(4))
    ]
    pooled = privacy.aggregate_audits(reports)
    assert pooled["clients"] == 4 and pooled["synthetic-images"] == 1200
    assert pooled["flagged-share"] < 0.12
    assert abs(pooled["closer-to-train-share"] - pooled["closer-to-train-share-reference"]) < 0.08
    assert pooled["exact-copies"] == 0
    assert sum(pooled["histogram-train"]) == 1200


def test_synthetic_images_of_a_label_without_references_are_counted_apart(pool):
    train_set, heldout, fresh = client(pool, seed=0)
    heldout = heldout.subset(np.flatnonzero(heldout.labels != 3))
    report = audit(fresh, train_set, heldout)
    assert report["synthetic-unmatched"] == int((fresh.labels == 3).sum()) > 0
    assert report["synthetic-images"] == len(fresh) - report["synthetic-unmatched"]


def test_audit_label_counts_follow_training_labels_where_measurable():
    train_labels = np.repeat(np.arange(10), [30, 10, 0, 0, 0, 0, 0, 0, 0, 60])
    heldout_labels = np.array([0, 0, 1, 1, 9])  # label 9: one held-out image, no reference
    assert privacy.audit_label_counts(train_labels, heldout_labels, 100) == [75, 25] + [0] * 8


@pytest.fixture(scope="module")
def memorizing_cvae(pool):
    """A CVAE overfit on 20 digits (two per label, many epochs), and 20 it never saw."""
    torch.manual_seed(0)
    members = pool.subset(np.concatenate([np.flatnonzero(pool.labels == c)[:2] for c in range(10)]))
    nonmembers = pool.subset(
        np.concatenate([np.flatnonzero(pool.labels == c)[2:4] for c in range(10)])
    )
    model = CVAE()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the autouse fixture does not cover module-scoped fixtures)
    try:
        train(
            model,
            TensorData.from_digits(members),
            cvae_loss,
            torch.optim.Adam(model.parameters(), lr=1e-3),
            epochs=150,
            batch_size=20,
            seed=0,
        )
    finally:
        torch.set_num_threads(threads)
    return model, members, nonmembers


def test_attacks_tell_members_of_a_memorizing_cvae(memorizing_cvae):
    model, members, nonmembers = memorizing_cvae
    report = privacy.membership_inference(
        model,
        (members.images, members.labels),
        (nonmembers.images, nonmembers.labels),
        generated_per_label=200,
    )
    assert (report["members"], report["non-members"]) == (20, 20)
    assert report["attacks"]["loss"]["auc"] > 0.9
    assert report["attacks"]["generated-nearest"]["auc"] > 0.9


def test_attacks_learn_nothing_from_a_cvae_that_saw_neither_set(pool, memorizing_cvae):
    torch.manual_seed(1)
    untrained = CVAE()
    members, nonmembers, _ = client(pool, seed=5, train_size=200, heldout_size=200)
    report = privacy.membership_inference(
        untrained,
        (members.images, members.labels),
        (nonmembers.images, nonmembers.labels),
        generated_per_label=100,
        reference=memorizing_cvae[0],
        keep_scores=True,
    )
    for name in ("loss", "calibrated-loss", "generated-nearest"):
        assert abs(report["attacks"][name]["auc"] - 0.5) < 0.1, name


def test_negative_elbo_is_the_summand_of_the_training_loss(pool):
    """With a tiny posterior scale every latent draw is the mean: the per-image scores
    average to cvae_loss on the same images."""
    torch.manual_seed(0)
    model = CVAE()
    with torch.no_grad():
        model.encoder[-1].bias[model.latent_dim :] = -30.0  # softplus(-30) ~ 1e-13
    digits = pool.subset(np.arange(16))
    scores = privacy.negative_elbo(model, digits.images, digits.labels, samples=2)
    data = TensorData.from_digits(digits)
    with torch.no_grad():
        expected = float(cvae_loss(model.eval(), data.images, data.labels))
    assert scores.shape == (16,)
    assert scores.mean() == pytest.approx(expected, rel=1e-4)


def test_auc_weights_non_members_to_the_members_label_mix():
    # the score is the label itself: members are mostly label 1, non-members mostly 0
    member_labels = np.array([1, 1, 1, 0])
    nonmember_labels = np.array([0, 0, 0, 1])
    plain = privacy.membership_auc(member_labels, nonmember_labels)
    matched = privacy.membership_auc(
        member_labels.astype(float), nonmember_labels.astype(float), member_labels, nonmember_labels
    )
    assert plain == pytest.approx(0.75)
    assert matched == pytest.approx(0.5)


def test_aggregate_auc_gives_the_mean_and_the_pooled_auc():
    summary = privacy.aggregate_auc(
        [1.0, 0.5, None],
        member_scores=[[3.0, 4.0], [1.0]],
        nonmember_scores=[[1.0, 2.0], [1.0]],
    )
    assert summary["clients"] == 2
    assert summary["mean"] == pytest.approx(0.75)
    assert (summary["min"], summary["max"]) == (0.5, 1.0)
    # pooled: members [3, 4, 1] vs non-members [1, 2, 1]
    assert summary["pooled"] == pytest.approx((3 + 3 + 1) / 9)
    assert privacy.aggregate_auc([0.7])["pooled"] is None
