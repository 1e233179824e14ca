"""Dirichlet label-skew partitions (flwr-datasets) and each client's 80/10/10 split.

Every client recomputes the same partition from (data, number of clients,
beta, seed), so no client ever needs another client's data. The split of the
whole pool is computed once per process and cached, because a simulation
actor serves many clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from fedaug_flwr.data import Digits


class PartitionError(ValueError):
    """The requested partition or per-client split cannot be made."""


@dataclass(frozen=True)
class ClientSplit:
    """One client's real data: train / validation / test, all disjoint."""

    partition_id: int
    train: Digits
    val: Digits
    test: Digits


def dirichlet_partitioner(
    labels: np.ndarray, num_partitions: int, beta: float, seed: int, min_partition_size: int
):
    """A flwr-datasets ``DirichletPartitioner`` over a local table of (index, label)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=beta,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    return partitioner


def dirichlet_indices(
    labels: np.ndarray, num_partitions: int, beta: float, seed: int, min_partition_size: int
) -> list[np.ndarray]:
    """Pool indices of every partition, or a :class:`PartitionError` saying what to change."""
    if num_partitions < 1:
        raise PartitionError(f"need at least 1 partition; got {num_partitions}")
    if len(labels) < num_partitions * min_partition_size:
        raise PartitionError(
            f"{len(labels)} images cannot give {num_partitions} clients at least "
            f"{min_partition_size} each: use fewer clients (num-supernodes), more data "
            "(dataset='mnist') or a smaller min-partition-size"
        )
    partitioner = dirichlet_partitioner(labels, num_partitions, beta, seed, min_partition_size)
    try:
        return [
            np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
            for pid in range(num_partitions)
        ]
    except ValueError as error:
        raise PartitionError(
            f"Dirichlet split of {len(labels)} images into {num_partitions} clients with "
            f"dirichlet-beta={beta} left some client under min-partition-size="
            f"{min_partition_size} after 10 tries: raise dirichlet-beta, use fewer clients, "
            f"more data or a smaller min-partition-size ({error})"
        ) from error


@cache
def _cached_indices(
    labels_bytes: bytes, num_partitions: int, beta: float, seed: int, min_size: int
) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    return tuple(dirichlet_indices(labels, num_partitions, beta, seed, min_size))


def split_train_val_test(
    count: int, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled positions 0..count-1 cut into train / val / test (each non-empty)."""
    n_val = max(1, round(count * val_fraction))
    n_test = max(1, round(count * test_fraction))
    if count - n_val - n_test < 1:
        raise PartitionError(
            f"a partition of {count} images is too small for a train/val/test split: "
            "raise min-partition-size, dirichlet-beta, or use fewer clients"
        )
    order = rng.permutation(count)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def client_split(
    pool: Digits,
    partition_id: int,
    num_partitions: int,
    beta: float,
    seed: int,
    min_partition_size: int,
    val_fraction: float,
    test_fraction: float,
) -> ClientSplit:
    """The real train / val / test data of one client, the same on every call."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1} (num-partitions)"
        )
    indices = _cached_indices(
        pool.labels.astype(np.int64).tobytes(), num_partitions, beta, seed, min_partition_size
    )[partition_id]
    rng = np.random.default_rng([seed, partition_id])
    train, val, test = split_train_val_test(len(indices), val_fraction, test_fraction, rng)
    return ClientSplit(
        partition_id=partition_id,
        train=pool.subset(indices[train]),
        val=pool.subset(indices[val]),
        test=pool.subset(indices[test]),
    )
