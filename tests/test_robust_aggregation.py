"""Robust aggregation of the classifier (``clf-aggregation``) against one poisoned client.

Five clients train one classifier round through the real pipeline and
ClientApp (``LocalGrid``); partition 4's update arrives scaled by 1,000 (the
test-only fault hook's ``poison``: a well-formed reply, which the reply checks
let through). FedAvg follows it far away; Flower's FedMedian, FedTrimmedAvg and
Krum keep the model near the honest FedAvg one.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedaug_flwr.config import AppConfig
from fedaug_flwr.faults import ENV_VAR
from fedaug_flwr.models import ExquisiteNetV1
from fedaug_flwr.training import seeded
from tests.local_grid import set_task_identity
from tests.test_checked_replies import FAST, own_data_nodes, run, write_node_files

pytestmark = pytest.mark.usefixtures("in_process_run")


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> list[str]:
    return write_node_files(tmp_path_factory.mktemp("node-data"), 5)


def distance(a: dict, b: dict) -> float:
    return math.sqrt(
        sum(
            float(((a[n].double() - b[n].double()) ** 2).sum())
            for n in a
            if a[n].is_floating_point()
        )
    )


@pytest.fixture(scope="module")
def clean_fedavg(node_files, tmp_path_factory) -> dict:
    """The classifier after one FedAvg round of five honest clients."""
    set_task_identity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, weights = run(tmp_path_factory.mktemp("clean"), own_data_nodes(node_files, 5))
    finally:
        torch.set_num_threads(threads)
    return weights


@pytest.mark.parametrize("aggregation", ["fedavg", "fedmedian", "fedtrimmedavg", "krum"])
def test_one_poisoned_client_against_each_aggregation(
    aggregation, clean_fedavg, node_files, tmp_path, monkeypatch
):
    # partition 4's update (its weights minus the global ones) arrives scaled by 1,000
    monkeypatch.setenv(ENV_VAR, "train.clf@4=poison")
    initial = seeded(AppConfig.from_run_config(FAST).seed, 2, ExquisiteNetV1)
    summary, poisoned = run(
        tmp_path, own_data_nodes(node_files, 5), **{"clf-aggregation": aggregation}
    )
    assert summary["classifier"]["aggregation"] == aggregation
    assert summary["config"]["clf-aggregation"] == aggregation
    step = distance(clean_fedavg, initial)  # how far one honest round moves the model
    moved = distance(poisoned, clean_fedavg) / step
    if aggregation == "fedavg":
        assert moved > 50  # the poisoned client drags the model far away (measured: 208)
    else:
        assert moved < 1.5  # near the honest FedAvg model (measured: 0.2 to 0.6)
