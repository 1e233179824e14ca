"""Dirichlet label-skew partitions, redrawn until every client has enough images, and
each client's 80/10/10 split.

Every client recomputes the same partition from (data, number of clients,
beta, seed), so no client ever needs another client's data. The split of the
whole pool is computed once per process and cached, because a simulation
actor serves many clients.
"""

from __future__ import annotations

import warnings
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
    draws: int = 0  # draws the Dirichlet split took (0: the node's own data, no split)


# flwr-datasets 0.6.1's DirichletPartitioner tries this many draws, then gives up.
FLWR_DATASETS_DRAWS = 11


@dataclass(frozen=True)
class DirichletSplit:
    """Pool indices of every partition and how many draws the split took."""

    indices: tuple[np.ndarray, ...]
    draws: int


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


def split_partitioner(labels: np.ndarray, split: DirichletSplit):
    """A flwr-datasets ``Partitioner`` serving an already drawn split, so that its plots
    and metrics (``plot_label_distributions``, ``compute_counts``) work for every split,
    also those drawn beyond the ``DirichletPartitioner``'s 11 draws."""
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

    class SplitPartitioner(Partitioner):
        @property
        def num_partitions(self) -> int:
            return len(split.indices)

        def load_partition(self, partition_id: int) -> Dataset:
            return self.dataset.select(split.indices[partition_id])

    partitioner = SplitPartitioner()
    partitioner.dataset = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    return partitioner


def _class_sizes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, sizes = np.unique(labels, return_counts=True)  # sorted, like flwr-datasets
    return classes, sizes


def _draw_cuts(
    rng: np.random.Generator, sizes: np.ndarray, num_partitions: int, beta: float
) -> np.ndarray:
    """One draw: per class (in sorted order) Dirichlet proportions over the partitions,
    turned into cut points exactly as flwr-datasets does (floor of cumulative share x
    class size); row c holds the cuts of class c, the last equal to the class size."""
    proportions = rng.dirichlet(np.full(num_partitions, beta), size=len(sizes))
    cuts = (np.cumsum(proportions, axis=1) * sizes[:, None]).astype(np.int64)
    cuts[:, -1] = sizes
    return cuts


def count_draws(
    labels: np.ndarray,
    num_partitions: int,
    beta: float,
    seed: int,
    min_partition_size: int,
    max_draws: int,
) -> int:
    """The number of the first draw that gives every partition ``min_partition_size``
    images (counting sizes only), or a :class:`PartitionError` after ``max_draws``."""
    _, sizes = _class_sizes(labels)
    rng = np.random.default_rng(seed)
    for draw in range(1, max_draws + 1):
        cuts = _draw_cuts(rng, sizes, num_partitions, beta)
        if np.diff(cuts, axis=1, prepend=0).sum(axis=0).min() >= min_partition_size:
            return draw
    raise PartitionError(
        f"no Dirichlet split of {len(labels)} images into {num_partitions} clients with "
        f"dirichlet-beta={beta} gave every client min-partition-size={min_partition_size} "
        f"images in {max_draws} draws (seed {seed}): raise partition-max-draws, lower "
        "min-partition-size, raise dirichlet-beta, use fewer clients or more data"
    )


def build_split(
    labels: np.ndarray, num_partitions: int, beta: float, seed: int, draw: int
) -> tuple[np.ndarray, ...]:
    """The partitions of draw number ``draw`` of the stream seeded by ``seed``: the same
    assignment and within-partition shuffle as flwr-datasets' DirichletPartitioner, whose
    result this equals for every draw it reaches (tests check it)."""
    classes, sizes = _class_sizes(labels)
    rng = np.random.default_rng(seed)
    for _ in range(draw):
        cuts = _draw_cuts(rng, sizes, num_partitions, beta)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for row, label in enumerate(classes):
        members = np.nonzero(labels == label)[0]
        for pid, chunk in enumerate(np.split(members, cuts[row, :-1])):
            parts[pid].extend(chunk.tolist())
    for part in parts:
        rng.shuffle(part)  # a list, as flwr-datasets shuffles it (same draws as an array)
    return tuple(np.asarray(part, dtype=np.int64) for part in parts)


def dirichlet_split(
    labels: np.ndarray,
    num_partitions: int,
    beta: float,
    seed: int,
    min_partition_size: int,
    max_draws: int = 100_000,
) -> DirichletSplit:
    """The study's split: Dirichlet label skew, redrawn until every client has
    ``min_partition_size`` images; a :class:`PartitionError` says what to change.

    flwr-datasets' ``DirichletPartitioner`` makes the split whenever it can: within its
    fixed 11 draws. The study redraws as often as needed, and at beta = 0.1 with 100
    clients on MNIST and 40 images each only about one draw in a thousand qualifies, so
    beyond those 11 draws this module continues the same seeded stream of draws itself
    (the partitioner has no setting for more). Sizes are checked from per-class counts
    alone (a few vector operations per draw, thousands of draws per second), and the
    indices are built once, for the first draw that qualifies.
    """
    if num_partitions < 1:
        raise PartitionError(f"need at least 1 partition; got {num_partitions}")
    if len(labels) < num_partitions * min_partition_size:
        raise PartitionError(
            f"{len(labels)} images cannot give {num_partitions} clients at least "
            f"{min_partition_size} each: use fewer clients (num-supernodes), more data "
            "(dataset='mnist') or a smaller min-partition-size"
        )
    draws = count_draws(labels, num_partitions, beta, seed, min_partition_size, max_draws)
    if draws <= FLWR_DATASETS_DRAWS:
        with warnings.catch_warnings():  # it warns on each of its redraws
            warnings.simplefilter("ignore", UserWarning)
            partitioner = dirichlet_partitioner(
                labels, num_partitions, beta, seed, min_partition_size
            )
            indices = tuple(
                np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
                for pid in range(num_partitions)
            )
    else:
        indices = build_split(labels, num_partitions, beta, seed, draws)
    return DirichletSplit(indices, draws)


def dirichlet_indices(
    labels: np.ndarray,
    num_partitions: int,
    beta: float,
    seed: int,
    min_partition_size: int,
    max_draws: int = 100_000,
) -> list[np.ndarray]:
    """Pool indices of every partition (see :func:`dirichlet_split`)."""
    split = dirichlet_split(labels, num_partitions, beta, seed, min_partition_size, max_draws)
    return list(split.indices)


@cache
def _cached_split(
    labels_bytes: bytes, num_partitions: int, beta: float, seed: int, min_size: int, max_draws: int
) -> DirichletSplit | PartitionError:
    """One split per process; a failed one is cached too, so the clients an actor serves
    do not each repeat up to ``max_draws`` draws to fail the same way."""
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    try:
        return dirichlet_split(labels, num_partitions, beta, seed, min_size, max_draws)
    except PartitionError as error:
        return error


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
    max_draws: int = 100_000,
    reshuffle: tuple[int, ...] | None = None,
) -> ClientSplit:
    """The real train / val / test data of one client, the same on every call.

    ``reshuffle``: ``None`` for the client's fixed 80/10/10 split; otherwise extra
    entropy (round, purpose) for a split drawn anew (``client-split-refresh``).
    """
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1} (num-partitions)"
        )
    split = _cached_split(
        pool.labels.astype(np.int64).tobytes(),
        num_partitions,
        beta,
        seed,
        min_partition_size,
        max_draws,
    )
    if isinstance(split, PartitionError):
        raise split
    indices = split.indices[partition_id]
    rng = np.random.default_rng([seed, partition_id, *(reshuffle or ())])
    train, val, test = split_train_val_test(len(indices), val_fraction, test_fraction, rng)
    return ClientSplit(
        partition_id=partition_id,
        train=pool.subset(indices[train]),
        val=pool.subset(indices[val]),
        test=pool.subset(indices[test]),
        draws=split.draws,
    )
