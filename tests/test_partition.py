"""Dirichlet partitions and per-client splits."""

from __future__ import annotations

import numpy as np
import pytest

from fedaug_flwr.data import load_mnist5k
from fedaug_flwr.partition import PartitionError, client_split, dirichlet_indices


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_mnist5k().pool.labels


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_partitions_cover_the_pool_once_and_respect_min_size(labels):
    parts = dirichlet_indices(labels, 10, beta=0.5, seed=1, min_partition_size=20)
    everything = np.concatenate(parts)
    assert len(everything) == len(labels) == len(np.unique(everything))
    assert min(len(p) for p in parts) >= 20


def test_same_seed_same_partitions_other_seed_other_partitions(labels):
    first = dirichlet_indices(labels, 10, 0.5, seed=3, min_partition_size=10)
    again = dirichlet_indices(labels, 10, 0.5, seed=3, min_partition_size=10)
    other = dirichlet_indices(labels, 10, 0.5, seed=4, min_partition_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_skew_grows_as_beta_falls(labels):
    entropy = {
        beta: mean_label_entropy(dirichlet_indices(labels, 10, beta, 0, 10), labels)
        for beta in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # nearly IID


def test_too_many_clients_says_what_to_change(labels):
    with pytest.raises(PartitionError, match="fewer clients"):
        dirichlet_indices(labels, 500, 0.5, 0, min_partition_size=10)


def test_client_split_is_80_10_10_disjoint_and_repeatable():
    pool = load_mnist5k().pool
    kwargs = dict(
        num_partitions=5,
        beta=0.5,
        seed=7,
        min_partition_size=10,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    split = client_split(pool, 2, **kwargs)
    total = len(split.train) + len(split.val) + len(split.test)
    assert abs(len(split.test) - 0.1 * total) <= 1 and abs(len(split.val) - 0.1 * total) <= 1
    partition = dirichlet_indices(pool.labels, 5, 0.5, 7, 10)[2]
    assert total == len(partition)  # train/val/test are a partition of the client's data
    merged = np.concatenate([split.train.labels, split.val.labels, split.test.labels])
    assert (
        np.bincount(merged, minlength=10).tolist()
        == np.bincount(pool.labels[partition], minlength=10).tolist()
    )
    again = client_split(pool, 2, **kwargs)
    assert np.array_equal(split.test.images, again.test.images)


def test_partition_id_out_of_range_is_rejected():
    pool = load_mnist5k().pool
    with pytest.raises(PartitionError, match="partition-id 5"):
        client_split(pool, 5, 5, 0.5, 0, 10, 0.1, 0.1)
