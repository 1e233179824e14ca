"""Evaluation on receipt: one message per client and round, the same recorded numbers.

The real pipeline and the real ClientApp run in this process (``LocalGrid``),
once with ``evaluate-on-receipt`` and once with Flower's separate evaluate
messages; the full simulation runs it through Flower in test_simulation.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client_app
from fedaug_flwr import pipeline
from fedaug_flwr.config import AppConfig
from fedaug_flwr.faults import ENV_VAR
from fedaug_flwr.protocol import RECEIVED_EVALUATION
from fedaug_flwr.results import SUMMARY
from fedaug_flwr.strategies import RoutedFedAvg
from tests.data_files import real_digits, write_npz
from tests.local_grid import FIRST_NODE_ID, SMALL_RUN, LocalGrid

ROUNDS = 3
pytestmark = pytest.mark.usefixtures("in_process_run")

SMALL = {**SMALL_RUN, "clf-rounds": ROUNDS, "quality-samples": 0}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("node-data")
    return [
        {
            "partition-id": i,
            "data-path": str(write_npz(folder / f"site-{i}.npz", *real_digits(90, offset=i))),
        }
        for i in range(3)
    ]


def run(nodes, tmp_path, name: str, **overrides) -> tuple[dict, LocalGrid]:
    grid = LocalGrid(client_app.app, nodes)
    config = AppConfig.from_run_config({**SMALL, **overrides, "output-dir": str(tmp_path / name)})
    output_dir = pipeline.run(grid, config, run_id=1)
    return json.loads((output_dir / SUMMARY).read_text()), grid


def classifier_messages(grid: LocalGrid) -> Counter:
    return Counter(kind for _, kind in grid.delivered if kind.endswith(".clf"))


def test_on_receipt_halves_the_messages_and_records_the_same_numbers(nodes, tmp_path):
    on_receipt, fused_grid = run(nodes, tmp_path, "on-receipt", **{"evaluate-on-receipt": True})
    separate, separate_grid = run(nodes, tmp_path, "separate", **{"evaluate-on-receipt": False})

    assert on_receipt["classifier"]["federated-evaluation"] == "on receipt"
    assert separate["classifier"]["federated-evaluation"] == "evaluate messages"
    # 3 clients: a train message per round each; evaluate messages only for the last model
    # (and the final per-client report, which both runs send)
    assert classifier_messages(separate_grid) == {"train.clf": 9, "evaluate.clf": 9 + 3}
    assert classifier_messages(fused_grid) == {"train.clf": 9, "evaluate.clf": 3 + 3}
    fused_rounds, separate_rounds = (s["classifier"]["rounds"] for s in (on_receipt, separate))
    assert [r["round"] for r in fused_rounds] == [1, 2, 3]
    for fused, plain in zip(fused_rounds, separate_rounds, strict=True):
        assert fused["evaluate-per-client"] == plain["evaluate-per-client"]
        assert len(fused["evaluate-per-client"]) == 3
        assert fused["evaluate"] == plain["evaluate"]
        assert fused["global-test"] == plain["global-test"]
        assert fused["train-per-client"] == plain["train-per-client"]
        assert fused["failures"] == plain["failures"] == []
    assert on_receipt["clients"] == separate["clients"]
    # only the last round has a separate federated evaluation to time
    timing = on_receipt["classifier"]["round-timing-s"]
    assert ["evaluate" in row for row in timing] == [False, False, False, True]


def test_a_client_failing_to_train_also_misses_its_evaluation_of_the_previous_model(
    nodes, tmp_path, monkeypatch
):
    monkeypatch.setenv(ENV_VAR, "train.clf@1:2")  # partition 1 fails round 2's training
    summary, _ = run(nodes, tmp_path, "fault", **{"evaluate-on-receipt": True})

    first, second, third = summary["classifier"]["rounds"]
    failed = FIRST_NODE_ID + 1
    # round 1's model was to be evaluated by round 2's train message, which failed
    assert [f["node-id"] for f in first["failures"]] == [failed]
    assert "injected test fault: train.clf on partition 1" in first["failures"][0]["reason"]
    assert sorted(c["partition-id"] for c in first["evaluate-per-client"]) == [0, 2]
    assert first["evaluate"]["num-clients"] == 2.0
    assert [f["node-id"] for f in second["failures"]] == [failed]
    assert len(second["train-per-client"]) == 2
    assert len(second["evaluate-per-client"]) == 3 and third["failures"] == []


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        ({}, "on receipt"),
        ({"fraction_train": 0.5}, "evaluate messages"),
        ({"fraction_evaluate": 0.5}, "evaluate messages"),
        ({"fraction_evaluate": 0.0}, "off"),
    ],
)
def test_on_receipt_only_when_every_client_trains_and_evaluates(fractions, expected):
    strategy = RoutedFedAvg("clf", evaluate_on_receipt=True, **fractions)
    assert strategy.federated_evaluation == expected


def test_a_client_that_ignores_the_request_is_recorded_as_failing_that_evaluation(nodes, tmp_path):
    # partition 2 runs a ClientApp that trains but never evaluates what it received
    def train_without_evaluating(msg: Message, context: Context) -> Message:
        reply = client_app.train_classifier(msg, context)
        if context.node_config["partition-id"] == 2:
            reply.content.pop(RECEIVED_EVALUATION, None)
        return reply

    app = ClientApp()
    app.train("cvae")(client_app.train_cvae)
    app.query("impute")(client_app.impute)
    app.train("clf")(train_without_evaluating)
    app.evaluate("clf")(client_app.evaluate_classifier)
    grid = LocalGrid(app, nodes)
    config = AppConfig.from_run_config({**SMALL, "clf-rounds": 2, "output-dir": str(tmp_path)})
    summary = json.loads((pipeline.run(grid, config, run_id=1) / SUMMARY).read_text())

    first, second = summary["classifier"]["rounds"]
    assert first["failures"] == [
        {
            "node-id": FIRST_NODE_ID + 2,
            "reason": "the train reply lacks its evaluation of the received model",
        }
    ]
    assert [c["partition-id"] for c in first["evaluate-per-client"]] == [0, 1]
    assert len(first["train-per-client"]) == 3  # its update still counts
    assert len(second["evaluate-per-client"]) == 3 and second["failures"] == []
