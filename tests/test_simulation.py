"""Integration: the whole three-phase run in a real Flower simulation (Ray), and
the determinism of a run, checked in-process through the real Server/ClientApps."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

from client_app import app as client_app
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import load_source
from fedaug_flwr.partition import client_split
from server_app import build_server_app
from tests.conftest import TINY

NUM_CLIENTS = 3


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    from flwr.simulation import run_simulation

    output = tmp_path_factory.mktemp("sim") / "run"
    # two classifier rounds: round 1's model is evaluated through Ray on receipt (round 2)
    overrides = {
        **TINY,
        "clf-rounds": 2,
        "imputation": "minority",
        "num-synthetic": 40,
        "output-dir": str(output),
    }
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
    return AppConfig.from_run_config(overrides), json.loads((output / "summary.json").read_text())


@pytest.mark.simulation
def test_summary_is_complete(simulated_run):
    config, summary = simulated_run
    assert summary["status"] == "completed"
    assert summary["config"] == config.to_run_config()
    assert summary["data"]["source"] == "mnist-5k" and summary["data"]["num-clients"] == 3
    assert len(summary["cvae"]["rounds"]) == config.cvae_rounds
    rounds = summary["classifier"]["rounds"]
    assert len(rounds) == config.clf_rounds
    assert summary["classifier"]["federated-evaluation"] == "on receipt"
    for evaluated in rounds:  # every round's model, each by every client
        assert len(evaluated["evaluate-per-client"]) == NUM_CLIENTS
        assert evaluated["evaluate"]["num-clients"] == NUM_CLIENTS
    for key in ("loss", "accuracy", "macro-f1", "accuracy-weighted", "macro-f1-weighted"):
        assert key in rounds[-1]["evaluate"] and key in summary["final"]["clients"]
    assert set(summary["final"]["global-test"]) >= {"loss", "accuracy", "macro-f1"}
    assert set(summary["timing-s"]) >= {"data", "cvae", "imputation", "classifier", "total"}
    folder = summary["output-dir"]
    for artifact in summary["artifacts"].values():
        assert (Path(folder) / artifact).stat().st_size > 0


@pytest.mark.simulation
def test_synthetic_counts_follow_the_mode_and_tests_stay_real(simulated_run):
    config, summary = simulated_run
    pool = load_source("mnist-5k", "").pool
    clients = summary["clients"]
    assert sorted(c["partition-id"] for c in clients) == list(range(NUM_CLIENTS))
    for client in clients:
        assert abs(client["synthetic-train"] - 40) <= 5
        before = client["label-counts-before"]
        assert sum(client["label-counts-synthetic"]) == client["synthetic-train"]
        # minority: the client's majority label gets no synthetic image
        majority = before.index(max(before))
        assert client["label-counts-synthetic"][majority] == 0
        split = client_split(
            pool,
            client["partition-id"],
            NUM_CLIENTS,
            config.dirichlet_beta,
            config.seed,
            config.min_partition_size,
            config.val_fraction,
            config.test_fraction,
        )
        assert client["real-train"] == len(split.train)
        assert before == split.train.label_counts()
        # evaluated on exactly the real test split, never on imputed images
        assert client["final-test"]["num-examples"] == client["test"] == len(split.test)


class InProcessGrid:
    """Delivers messages to the real ClientApp in this process (no Ray, no SuperLink).

    ``node_ids``: the id of each partition's node (a SuperLink's are random numbers); the
    grid lists them in ascending order, as a set of small ints iterates."""

    def __init__(self, run_config: dict, num_nodes: int, node_ids: list[int] | None = None):
        node_ids = node_ids or [100 + i for i in range(num_nodes)]
        self.contexts = {
            node_ids[i]: Context(
                1,
                node_ids[i],
                {"partition-id": i, "num-partitions": num_nodes},
                RecordDict(),
                run_config,
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return sorted(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # SuperLink's job
            try:
                replies.append(client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # noqa: BLE001 - becomes an error reply, as in Flower
                replies.append(Message(Error(code=0, reason=repr(error)), reply_to=message))
        return replies


class DrawingGrid(InProcessGrid):
    """Takes a number from the shared ``random`` at every exchange, as Flower's heartbeat
    thread does in a simulation's ServerApp process."""

    def send_and_receive(self, messages, *, timeout=None):
        random.random()
        return super().send_and_receive(messages, timeout=timeout)


def run_in_process(
    tmp_path,
    name: str,
    seed: int,
    node_ids: list[int] | None = None,
    grid_class: type[InProcessGrid] = InProcessGrid,
    **overrides,
) -> dict:
    from flwr.supercore.task_identity import TaskIdentity  # internal; see facts sheet §8

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    config = {**TINY, "num-synthetic": 20, "seed": seed, "output-dir": str(tmp_path / name)}
    config.update(overrides)
    grid = grid_class(config, len(node_ids) if node_ids else 2, node_ids)
    build_server_app(config)(grid, Context(1, 1, {}, RecordDict(), {}))
    return json.loads((tmp_path / name / "summary.json").read_text())


def drawn_partitions(summary: dict, phase: str) -> list[list[int]]:
    """The partitions that trained in each round of ``phase``."""
    return [
        sorted(client["partition-id"] for client in round_["train-per-client"])
        for round_ in summary[phase]["rounds"]
    ]


@pytest.mark.usefixtures("in_process_run")
def test_same_seed_draws_the_same_partitions_whatever_ids_the_nodes_get(tmp_path):
    """Flower's strategies draw each round's nodes from the grid's list of node ids, and a
    SuperLink gives the nodes random ids: two runs of one seed must still train the same
    partitions in every round (here the second run lists partition 0's node last)."""
    sampled = {"fraction-train": 0.5, "cvae-rounds": 2, "clf-rounds": 2, "quality-samples": 0}
    first = run_in_process(tmp_path, "a", 5, [10, 20, 30, 40], **sampled)
    second = run_in_process(tmp_path, "b", 5, [40, 10, 20, 30], **sampled)
    for phase in ("cvae", "classifier"):
        assert drawn_partitions(first, phase) == drawn_partitions(second, phase)
        assert all(len(partitions) == 2 for partitions in drawn_partitions(first, phase))
    assert first["cvae"]["rounds"] == second["cvae"]["rounds"]
    assert first["final"] == second["final"]


@pytest.mark.usefixtures("in_process_run")
def test_same_seed_same_partitions_labels_and_metrics(tmp_path):
    first = run_in_process(tmp_path, "a", seed=5)
    second = run_in_process(tmp_path, "b", seed=5)
    assert first["clients"] == second["clients"]
    assert first["final"] == second["final"]
    assert first["cvae"]["rounds"] == second["cvae"]["rounds"]
    assert first["generator-quality"] == second["generator-quality"]
    # without pretraining, generator quality comes from the small fixed classifier
    assert "quality-samples" in first["generator-quality"]["classifier"]
    assert "pretraining" not in first and first["final"]["model"] == "federated"
    # ...and the seed matters: another seed gives client 0 other data
    config = AppConfig.from_run_config(first["config"])
    other = client_split(
        load_source("mnist-5k", "").pool,
        0,
        2,
        config.dirichlet_beta,
        6,
        config.min_partition_size,
        0.1,
        0.1,
    )
    assert other.train.label_counts() != first["clients"][0]["label-counts-before"]


@pytest.mark.usefixtures("in_process_run")
def test_a_rounds_draw_depends_on_seed_and_round_only(tmp_path):
    """The classifier's rounds draw the same partitions with and without a CVAE phase
    before them (the cells of one seed stay paired), and whatever else takes numbers
    from the shared ``random`` meanwhile."""
    sampled = {"fraction-train": 0.5, "cvae-rounds": 3, "clf-rounds": 3, "quality-samples": 0}
    nodes = [10, 20, 30, 40]
    with_cvae = run_in_process(tmp_path, "a", 5, nodes, imputation="minority", **sampled)
    without = run_in_process(tmp_path, "b", 5, nodes, DrawingGrid, imputation="none", **sampled)
    assert "rounds" not in without["cvae"]  # no CVAE phase drew before the classifier's
    assert drawn_partitions(with_cvae, "classifier") == drawn_partitions(without, "classifier")
    assert len({tuple(p) for p in drawn_partitions(without, "classifier")}) > 1
