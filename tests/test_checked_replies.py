"""Replies the server must not trust: each is that client's failure, never the run's.

The real pipeline and the real ClientApp run in this process (``LocalGrid``);
a test ClientApp wraps the real one and changes chosen replies after the real
handler made them (a malformed or absurd reply), or the test-only fault hook
poisons an update (a well-formed reply from a malicious client).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import client_app
from fedaug_flwr import pipeline
from fedaug_flwr.config import AppConfig
from fedaug_flwr.models import ExquisiteNetV1
from fedaug_flwr.protocol import ARRAYS, CONFIG, METRICS, RECEIVED_EVALUATION, TaskConfig
from fedaug_flwr.results import SUMMARY, load_state_dict
from fedaug_flwr.strategies import PhaseError
from fedaug_flwr.transport import from_array, to_array, weighted_mean
from tests.data_files import real_digits, write_npz
from tests.local_grid import FIRST_NODE_ID, SMALL_RUN, LocalGrid

pytestmark = pytest.mark.usefixtures("in_process_run")

# No CVAE (no imputation, no pretraining): the imputation query still reports every
# client's sizes; one classifier round, then its evaluation and the final one.
FAST = {**SMALL_RUN, "imputation": "none", "quality-samples": 0}


def write_node_files(folder: Path, count: int = 6) -> list[str]:
    """``count`` nodes' own data: 100 real digits each (80 train, 10 val, 10 test)."""
    return [
        str(write_npz(folder / f"site-{i}.npz", *real_digits(100, offset=10 + i)))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> list[str]:
    return write_node_files(tmp_path_factory.mktemp("node-data"))


def own_data_nodes(files: list[str], count: int) -> list[dict]:
    return [{"partition-id": i, "data-path": path} for i, path in enumerate(files[:count])]


Change = Callable[[RecordDict], None]


class Tampering:
    """The real ClientApp; its replies to ``message_type`` from the given partitions are
    changed after the real handler made them."""

    def __init__(self, message_type: str, changes: dict[int, Change]) -> None:
        self.message_type = message_type
        self.changes = changes

    def __call__(self, message: Message, context) -> Message:
        reply = client_app.app(message, context)
        change = self.changes.get(context.node_config["partition-id"])
        if message.metadata.message_type == self.message_type and change is not None:
            change(reply.content)
        return reply


def run(tmp_path, nodes, app=client_app.app, name="run", **overrides) -> tuple[dict, dict]:
    """Run the pipeline; its summary and its classifier weights."""
    config = AppConfig.from_run_config({**FAST, **overrides, "output-dir": str(tmp_path / name)})
    output_dir = pipeline.run(LocalGrid(app, nodes), config, run_id=1)
    summary = json.loads((output_dir / SUMMARY).read_text())
    return summary, load_state_dict(output_dir / "classifier.pt")


def failures_of(failures: list[dict]) -> dict[int, str]:
    return {failure["node-id"] - FIRST_NODE_ID: failure["reason"] for failure in failures}


def first_array(content: RecordDict, kind: str = "f") -> str:
    """The name of the first array of this dtype kind with more than one row."""
    arrays = content[ARRAYS]
    return next(n for n, a in arrays.items() if a.shape and a.shape[0] > 1 and kind in a.dtype[0])


def broadcastable_shape(content: RecordDict) -> None:
    name = first_array(content)
    shape = content[ARRAYS][name].shape
    content[ARRAYS][name] = to_array(np.zeros((1, *shape[1:]), dtype=np.float32))


def nan_value(content: RecordDict) -> None:
    name = first_array(content)
    values = from_array(content[ARRAYS][name])
    values.flat[0] = np.nan
    content[ARRAYS][name] = to_array(values)


def float64(content: RecordDict) -> None:
    name = first_array(content)
    content[ARRAYS][name] = to_array(from_array(content[ARRAYS][name]).astype(np.float64))


def missing_array(content: RecordDict) -> None:
    del content[ARRAYS][first_array(content)]


def examples(value) -> Change:
    def change(content: RecordDict) -> None:
        content[METRICS]["num-examples"] = value

    return change


def without(key: str) -> Change:
    def change(content: RecordDict) -> None:
        del content[METRICS][key]

    return change


def metric(key: str, value) -> Change:
    def change(content: RecordDict) -> None:
        content[METRICS][key] = value

    return change


def extra_record(content: RecordDict) -> None:
    content["extra"] = MetricRecord({"x": 1.0})


def all_finite(weights: dict) -> bool:
    return all(torch.isfinite(t.float()).all() for t in weights.values())


# Each run: one tampered update from the first client in partition order (whose keys
# Flower's own check takes as the reference), others from later clients; the good
# replies (at least min-clients = 2) make the model.
CASES = {
    "shape-dtype-nan": (
        {0: broadcastable_shape, 2: nan_value, 4: float64},
        {
            0: r"rejected reply: array '.+' is float32 \(1,.*\); the model sent has float32",
            2: r"rejected reply: array '.+' holds non-finite values",
            4: r"rejected reply: array '.+' is float64 .*; the model sent has float32",
        },
    ),
    "examples": (
        {0: examples(10**9), 1: examples(-80), 3: examples(2.5), 5: examples(0)},
        {
            0: r"num-examples=1e\+09 is more than the 100 images it reported owning",
            1: r"num-examples must be a positive integer; got -80",
            3: r"num-examples must be a positive integer; got 2.5",
            5: r"num-examples must be a positive integer; got 0",
        },
    ),
    "records-and-metrics": (
        {0: without("train-loss"), 1: metric("train-loss", math.inf), 3: extra_record},
        {
            0: r"metrics missing \['train-loss'\]",
            1: r"metric 'train-loss' is not finite: inf",
            3: r"records \['arrays', 'extra', 'metrics'\], expected \['arrays', 'metrics'\]",
        },
    ),
    "missing-array-later": (
        {4: missing_array, 5: broadcastable_shape},
        {4: r"arrays missing \['.+'\]", 5: r"is float32 \(1,"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_update_is_that_clients_failure_never_the_runs(case, node_files, tmp_path):
    changes, reasons = CASES[case]
    nodes = own_data_nodes(node_files, 6)
    summary, weights = run(tmp_path, nodes, Tampering("train.clf", changes))

    assert summary["status"] == "completed"
    first = summary["classifier"]["rounds"][0]
    failed = failures_of(first["failures"])
    assert failed.keys() == changes.keys()
    for partition, reason in reasons.items():
        assert re.search(reason, failed[partition]), failed[partition]
    counted = sorted(row["partition-id"] for row in first["train-per-client"])
    assert counted == sorted(set(range(6)) - changes.keys())
    assert all_finite(weights)
    # the clients' evaluations of the model are untouched, and all six count
    assert len(first["evaluate-per-client"]) == 6


def test_an_update_may_come_in_the_dtypes_of_the_model_it_received(node_files, tmp_path):
    # FedAvg's mean makes BatchNorm's int64 counters float64 (as Flower's does): from
    # round 2 a client may answer with those. In round 1 the model sent has int64 ones.
    def counters_as_float64(content: RecordDict) -> None:
        for name, array in list(content[ARRAYS].items()):
            if array.dtype == "int64":
                content[ARRAYS][name] = to_array(from_array(array).astype(np.float64))

    nodes = own_data_nodes(node_files, 3)
    summary, _ = run(
        tmp_path, nodes, Tampering("train.clf", {0: counters_as_float64}), **{"clf-rounds": 2}
    )
    first, second = summary["classifier"]["rounds"]
    assert re.search(
        r"is float64 \(\); the model sent has int64", failures_of(first["failures"])[0]
    )
    assert second["failures"] == [] and len(second["train-per-client"]) == 3


def test_all_zero_weights_fail_the_phase_with_the_reason_not_a_division(node_files, tmp_path):
    nodes = own_data_nodes(node_files, 3)
    zero = Tampering("train.clf", dict.fromkeys(range(3), examples(0)))
    with pytest.raises(PhaseError, match=r"only 0 of 3 clients answered.*got 0"):
        run(tmp_path, nodes, zero)


def test_a_malformed_evaluation_is_left_out_of_the_metrics(node_files, tmp_path):
    changes = {0: metric("accuracy", math.nan), 1: examples(10**6), 2: without("macro-f1")}
    nodes = own_data_nodes(node_files, 5)
    summary, _ = run(tmp_path, nodes, Tampering("evaluate.clf", changes))

    first = summary["classifier"]["rounds"][0]
    failed = failures_of(first["failures"])
    assert failed.keys() == {0, 1, 2}
    assert "metric 'accuracy' is not finite" in failed[0]
    assert "num-examples=1e+06 is more than the 10 test images it reported" in failed[1]
    assert "metrics missing ['macro-f1']" in failed[2]
    assert [row["partition-id"] for row in first["evaluate-per-client"]] == [3, 4]
    assert first["evaluate"]["num-clients"] == 2.0 and math.isfinite(first["evaluate"]["accuracy"])
    final = failures_of(summary["final"]["failures"])  # the final evaluation, the same way
    assert final.keys() == {0, 1, 2}
    assert summary["final"]["clients"]["num-clients"] == 2.0


def test_an_evaluation_received_with_an_update_is_checked_on_its_own(node_files, tmp_path):
    # round 2's train replies carry the clients' evaluations of round 1's model
    def bad_evaluation(content: RecordDict) -> None:
        if RECEIVED_EVALUATION in content:
            content[RECEIVED_EVALUATION]["loss"] = math.nan

    nodes = own_data_nodes(node_files, 3)
    summary, _ = run(
        tmp_path, nodes, Tampering("train.clf", {1: bad_evaluation}), **{"clf-rounds": 2}
    )

    first, second = summary["classifier"]["rounds"]
    assert failures_of(first["failures"]) == {
        1: "rejected evaluation of the received model: metric 'loss' is not finite: nan"
    }
    assert len(first["evaluate-per-client"]) == 2
    assert second["failures"] == [] and len(second["train-per-client"]) == 3


def test_a_cvae_update_with_an_implausible_count_is_rejected(node_files, tmp_path):
    nodes = own_data_nodes(node_files, 3)
    summary, _ = run(
        tmp_path,
        nodes,
        Tampering("train.cvae", {2: examples(10**9)}),
        imputation="uniform",
    )
    failed = failures_of(summary["cvae"]["rounds"][0]["failures"])
    assert failed == {
        2: "rejected reply: num-examples=1e+09 is more than what is plausible for one client "
        "(100000000)"
    }


def test_a_malformed_imputation_reply_is_that_clients_failure(node_files, tmp_path):
    changes = {
        0: without("real-train"),  # a KeyError in the server before
        1: metric("real-label-counts", [1] * 10),  # does not add up to real-train
    }
    nodes = own_data_nodes(node_files, 4)
    summary, _ = run(tmp_path, nodes, Tampering("query.impute", changes))

    failed = failures_of(summary["imputation"]["failures"])
    assert "metrics missing ['real-train']" in failed[0]
    assert "'real-label-counts' add up to 10, not real-train=80" in failed[1]
    assert [client["partition-id"] for client in summary["clients"]] == [2, 3]
    # the server knows nothing of their sizes: their updates cannot count either
    trained = failures_of(summary["classifier"]["rounds"][0]["failures"])
    assert (
        trained[0]
        == trained[1]
        == ("rejected reply: the server has no sizes for this node: it missed the imputation")
    )


def test_supernodes_with_different_num_partitions_are_refused(tmp_path):
    nodes = [
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 1, "num-partitions": 3},
        {"partition-id": 2, "num-partitions": 4},
    ]
    with pytest.raises(
        PhaseError,
        match=r"disagree on num-partitions \(num-partitions=3 on node\(s\) \[1000, 1001\]; "
        r"num-partitions=4 on node\(s\) \[1002\]\)",
    ):
        run(tmp_path, nodes)
    assert not (tmp_path / "run" / SUMMARY).exists()


# ------------------------------------------------------------ a diverging client


def test_a_client_whose_loss_is_not_finite_stops_and_says_so(node_files):
    grid = LocalGrid(client_app.app, own_data_nodes(node_files, 1))
    config = AppConfig.from_run_config(FAST)
    broken = ExquisiteNetV1().state_dict()
    broken = {name: t.fill_(math.nan) if t.is_floating_point() else t for name, t in broken.items()}
    record = TaskConfig(config, "mnist-5k", "").to_record()
    record["server-round"] = 1
    content = RecordDict({ARRAYS: ArrayRecord(broken), CONFIG: ConfigRecord(dict(record))})
    message = Message(content, dst_node_id=FIRST_NODE_ID, message_type="train.clf")

    (reply,) = grid.send_and_receive([message])

    assert reply.has_error()
    assert (
        "NonFiniteLoss: local training stopped: the loss became nan in epoch 1 of 1, batch 1"
        in (reply.error.reason)
    )


def test_fedavg_mean_refuses_weights_that_are_not_positive():
    record = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    for weights in ([0, 0], [5, -5], [1, math.nan]):
        with pytest.raises(ValueError, match="FedAvg weights must be finite numbers > 0"):
            weighted_mean([record, record], weights)
