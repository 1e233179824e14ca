"""The study's choices, each checked against numbers worked out by hand: the split that
is redrawn until every client has 40 images, FedAvg weights by real data, the two ways
of binarizing synthetic images and of rounding minority counts, and the two presets."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import load_mnist5k
from fedaug_flwr.imputation import generate, minority_counts
from fedaug_flwr.models import CVAE
from fedaug_flwr.partition import (
    FLWR_DATASETS_DRAWS,
    PartitionError,
    build_split,
    client_split,
    count_draws,
    dirichlet_partitioner,
    dirichlet_split,
)
from fedaug_flwr.presets import AS_RUN, AS_WRITTEN, PRESETS, matching_preset
from fedaug_flwr.results import load_state_dict, read_summary
from server_app import build_server_app
from tests.local_grid import SMALL_RUN, LocalGrid

REPO = Path(__file__).resolve().parent.parent
# MNIST's training-set label counts: the draw loop only ever looks at counts per class.
MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def mnist_like_labels() -> np.ndarray:
    return np.repeat(np.arange(10), MNIST_COUNTS)


def sizes(parts) -> np.ndarray:
    return np.array([len(part) for part in parts])


# ------------------------------------------------------------------ the Dirichlet split


def test_beta_01_with_100_clients_of_40_images_is_drawn_deterministically():
    labels = mnist_like_labels()
    split = dirichlet_split(labels, 100, beta=0.1, seed=0, min_partition_size=40)
    again = dirichlet_split(labels, 100, beta=0.1, seed=0, min_partition_size=40)
    assert split.draws > FLWR_DATASETS_DRAWS  # beyond what flwr-datasets would try
    assert split.draws == again.draws
    assert all(np.array_equal(a, b) for a, b in zip(split.indices, again.indices, strict=True))
    assert sizes(split.indices).min() >= 40
    everything = np.concatenate(split.indices)
    assert len(everything) == len(labels) == len(np.unique(everything))
    # it is the first draw that qualifies: the one before left a client under 40
    before = build_split(labels, 100, 0.1, 0, split.draws - 1)
    assert sizes(before).min() < 40


def test_flwr_datasets_split_is_reproduced_where_it_succeeds():
    labels = load_mnist5k().pool.labels.astype(np.int64)
    # a setting where flwr-datasets needs several of its draws (not just the first)
    draws = count_draws(labels, 20, 0.3, seed=7, min_partition_size=100, max_draws=50)
    assert 1 < draws <= FLWR_DATASETS_DRAWS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partitioner = dirichlet_partitioner(labels, 20, 0.3, 7, 100)
        theirs = [np.asarray(partitioner.load_partition(p)["index"]) for p in range(20)]
    ours = build_split(labels, 20, 0.3, 7, draws)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_giving_up_says_what_to_change():
    with pytest.raises(PartitionError, match="raise partition-max-draws") as error:
        dirichlet_split(mnist_like_labels(), 100, 0.1, 0, 40, max_draws=5)
    assert "in 5 draws" in str(error.value)


def test_client_split_records_the_draws_and_can_be_reshuffled_per_round():
    pool = load_mnist5k().pool
    kwargs = dict(
        num_partitions=5,
        beta=0.5,
        seed=7,
        min_partition_size=40,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    fixed = client_split(pool, 1, **kwargs)
    assert fixed.draws >= 1
    round_1 = client_split(pool, 1, **kwargs, reshuffle=(1, 8))
    round_2 = client_split(pool, 1, **kwargs, reshuffle=(2, 8))

    # the same client's images, cut differently
    def labels(split):
        return sorted(np.concatenate([split.train.labels, split.val.labels, split.test.labels]))

    assert labels(round_1) == labels(fixed)
    assert not np.array_equal(round_1.train.images, round_2.train.images)
    again = client_split(pool, 1, **kwargs, reshuffle=(1, 8))
    assert np.array_equal(round_1.test.images, again.test.images)


# ------------------------------------------------------------------ synthetic images


def test_minority_rounding_nearest_and_up():
    counts = [10, 7, 7, 9, 10, 10, 10, 10, 10, 10]  # deficits 0,3,3,1,0...: sum 7
    # k = 10: shares 30/7 = 4.29, 4.29, 10/7 = 1.43
    assert minority_counts(counts, 10, "nearest").tolist() == [0, 4, 4, 1, 0, 0, 0, 0, 0, 0]
    # round(x + 0.5): 4.79 -> 5, 1.93 -> 2, and 0 + 0.5 -> 0 (half to even)
    assert minority_counts(counts, 10, "up").tolist() == [0, 5, 5, 2, 0, 0, 0, 0, 0, 0]
    # exact halves after adding 0.5 go to the even side, as Python's round does
    ties = [4, 3, 3, 2, 4, 4, 4, 4, 4, 4]  # deficits 1, 1, 2: shares 1, 1, 2 for k = 4
    assert minority_counts(ties, 4, "nearest").tolist()[:4] == [0, 1, 1, 2]
    assert minority_counts(ties, 4, "up").tolist()[:4] == [0, 2, 2, 2]
    assert [round(x + 0.5) for x in (1.0, 1.0, 2.0)] == [2, 2, 2]


class FaintDecoder(CVAE):
    """Decodes every code to the same faint image: pixel i has probability i / 2000."""

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image = torch.arange(784, dtype=torch.float32).view(1, 1, 28, 28) / 2000.0
        return image.expand(len(z), 1, 28, 28)


def test_binarize_round_and_rescale():
    labels = np.array([3, 5])
    rounded = generate(FaintDecoder(), labels, seed=0, binarize="round")
    rescaled = generate(FaintDecoder(), labels, seed=0, binarize="rescale")
    # round at 0.5: pixels 1000.. would be needed, the brightest is 783 / 2000 = 0.39
    assert rounded.sum() == 0
    # divided by the brightest pixel (783 / 2000), pixel i becomes i / 783: 1 from i = 392
    assert rescaled[0].reshape(-1).tolist() == [int(i >= 392) for i in range(784)]
    assert set(np.unique(rescaled)) == {0, 1}


# ------------------------------------------------------------------ presets


def test_presets_are_complete_valid_and_the_toml_files_hold_them():
    assert set(AS_WRITTEN) == set(AS_RUN)
    defaults = AppConfig.from_run_config({}).to_run_config()
    assert matching_preset(defaults) == {"name": "as-written"}  # the paper is the default
    for name, values in PRESETS.items():
        config = AppConfig.from_run_config(values).to_run_config()
        assert matching_preset(config) == {"name": name}
        with (REPO / "conf" / f"study-{name}.toml").open("rb") as handle:
            assert tomllib.load(handle) == values
    custom = matching_preset({**defaults, **AS_RUN, "clf-batch-size": 32})
    assert custom == {
        "name": "custom",
        "nearest": "as-run",
        "differs": {"clf-batch-size": [32, 10]},
    }
    # the as-run preset differs from the paper where the code did
    assert AS_RUN["clf-optimizer"] == "sgd" and AS_WRITTEN["clf-optimizer"] == "adam"


class RecordingGrid(LocalGrid):
    """The in-process grid, keeping every classifier update a client sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[int, dict]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == "train.clf" and not reply.has_error():
                weight = reply.content["metrics"]["num-examples"]
                self.updates.append((weight, reply.content["arrays"].to_torch_state_dict()))
        return replies


def run_small(tmp_path: Path, name: str, **overrides) -> tuple[dict, RecordingGrid]:
    import client_app

    output = tmp_path / name
    run_config = {
        **SMALL_RUN,
        "quality-samples": 0,
        "output-dir": str(output),
        **overrides,
    }
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = RecordingGrid(client_app.app, nodes)
    build_server_app(run_config)(grid, Context(1, 1, {}, RecordDict(), {}))
    return read_summary(output), grid


@pytest.mark.usefixtures("in_process_run")
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_runs_at_a_tiny_size(tmp_path, preset):
    summary, _ = run_small(tmp_path, preset, **{**PRESETS[preset], **SMALL_RUN})
    # the preset's values but the rounds, shrunk to one per phase here
    recorded = summary["study-preset"]
    assert recorded["name"] == "custom" and recorded["nearest"] == preset
    assert set(recorded["differs"]) == {"cvae-rounds", "clf-rounds"}
    assert summary["data"]["partition-draws"] >= 1
    assert summary["final"]["clients"]["num-clients"] == 3


@pytest.mark.usefixtures("in_process_run")
def test_fedavg_weights_clients_by_their_real_images(tmp_path):
    summary, grid = run_small(tmp_path, "real")
    real = {c["partition-id"]: c["real-train"] + c["val"] + c["test"] for c in summary["clients"]}
    augmented = {
        c["partition-id"]: c["real-train"] + c["synthetic-train"] for c in summary["clients"]
    }
    weights = [weight for weight, _ in grid.updates]
    assert sorted(weights) == sorted(real.values()) != sorted(augmented.values())
    final = load_state_dict(Path(summary["output-dir"]) / "classifier.pt")
    total = sum(weights)
    name = (
        "classifier.5.weight"
        if "classifier.5.weight" in final
        else next(n for n, t in final.items() if t.is_floating_point())
    )
    expected = sum(w / total * update[name].double() for w, update in grid.updates)
    assert torch.allclose(final[name].double(), expected, atol=1e-6)
    unweighted = sum(update[name].double() for _, update in grid.updates) / len(grid.updates)
    assert not torch.allclose(final[name].double(), unweighted, atol=1e-6)
