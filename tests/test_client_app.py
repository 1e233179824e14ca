"""The real ClientApp handlers, called with real Flower Messages and Contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app import app as client_app
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import load_source
from fedaug_flwr.models import CVAE, ExquisiteNetV1, load_classifier
from fedaug_flwr.partition import client_split
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.replies import roster_check
from fedaug_flwr.training import TensorData, evaluate_classifier
from tests.conftest import TINY, make_context, make_message

NUM_PARTITIONS = 4
# Partition 7 of 12: 131 training images, a sixth of partition 2 of 4; the classifier tests
# train and evaluate ExquisiteNet on its split, and its epochs are what those tests cost.
SMALL_CLIENT = (7, 12)


def task_record(**overrides) -> ConfigRecord:
    config = AppConfig.from_run_config({**TINY, **overrides})
    record = TaskConfig(config, "mnist-5k", "").to_record()
    record["server-round"] = 1
    return record


def expected_split(partition_id: int, config: AppConfig, num_partitions: int = NUM_PARTITIONS):
    return client_split(
        load_source("mnist-5k", "").pool,
        partition_id,
        num_partitions,
        config.dirichlet_beta,
        config.seed,
        config.min_partition_size,
        config.val_fraction,
        config.test_fraction,
    )


def impute(context, **overrides):
    content = RecordDict(
        {"generator": ArrayRecord(CVAE().state_dict()), "config": task_record(**overrides)}
    )
    return client_app(make_message(content, "query.impute"), context)


@pytest.mark.parametrize("partition_id", [0, 3])
def test_roster_answers_the_nodes_partition_id_and_passes_the_servers_check(partition_id):
    reply = client_app(make_message(RecordDict(), "query.roster"), make_context(partition_id, 4))
    assert not reply.has_error()
    assert dict(reply.content["metrics"]) == {"partition-id": partition_id}
    assert roster_check(reply, 7) is None


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"partition-id": -1}, "'partition-id' must be an integer >= 0; got -1"),
        ({"partition-id": 1.5}, "'partition-id' must be an integer >= 0; got 1.5"),
        ({"partition-id": 1, "extra": 2}, "unexpected ['extra']"),
        ({}, "metrics missing ['partition-id']"),
    ],
)
def test_a_malformed_roster_reply_is_refused_with_the_reason(metrics, reason):
    sent = make_message(RecordDict(), "query.roster")
    reply = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)
    assert reason in roster_check(reply, 7)


def test_train_cvae_returns_one_model_and_weighting_metrics():
    context = make_context(1, NUM_PARTITIONS)
    sent = CVAE().state_dict()
    content = RecordDict({"arrays": ArrayRecord(sent), "config": task_record()})
    reply = client_app(make_message(content, "train.cvae"), context)
    assert not reply.has_error()
    assert list(reply.content.array_records) == ["arrays"]
    metrics = reply.content["metrics"]
    split = expected_split(1, AppConfig.from_run_config(TINY))
    real = len(split.train) + len(split.val) + len(split.test)  # fedavg-weights = "real"
    assert metrics["num-examples"] == real and metrics["partition-id"] == 1
    assert np.isfinite(metrics["train-loss"]) and np.isfinite(metrics["val-loss"])
    after = reply.content["arrays"].to_torch_state_dict()
    assert set(after) == set(sent)
    assert all(after[k].shape == sent[k].shape for k in sent)
    # trained, not echoed: every layer's weights moved
    moved = [k for k in sent if k.endswith("weight") and not torch.equal(after[k], sent[k])]
    assert moved == [k for k in sent if k.endswith("weight")]


@pytest.mark.parametrize("mode", ["uniform", "minority"])
def test_impute_caches_k_synthetic_images_per_mode(mode):
    context = make_context(0, NUM_PARTITIONS)
    reply = impute(context, imputation=mode, **{"num-synthetic": 60})
    metrics = reply.content["metrics"]
    assert metrics["synthetic-train"] == sum(metrics["synthetic-label-counts"])
    assert abs(metrics["synthetic-train"] - 60) <= 5
    stored = context.state["synthetic"]
    assert stored["images"].numpy().shape == (metrics["synthetic-train"], 28, 28)
    assert set(np.unique(stored["images"].numpy())) <= {0, 1}
    if mode == "minority":
        real = np.array(metrics["real-label-counts"])
        assert np.array(metrics["synthetic-label-counts"])[real == real.max()].sum() == 0


def test_no_imputation_caches_nothing_but_reports_counts():
    context = make_context(0, NUM_PARTITIONS)
    reply = impute(context, imputation="none")
    assert reply.content["metrics"]["synthetic-train"] == 0


def test_classifier_trains_on_real_plus_synthetic_and_evaluates_on_real_test_only():
    context = make_context(*SMALL_CLIENT)
    impute(context, **{"num-synthetic": 50})
    synthetic = len(context.state["synthetic"]["labels"].numpy())
    split = expected_split(SMALL_CLIENT[0], AppConfig.from_run_config(TINY), SMALL_CLIENT[1])
    weights = ArrayRecord(ExquisiteNetV1().state_dict())
    train = client_app(
        make_message(RecordDict({"arrays": weights, "config": task_record()}), "train.clf"),
        context,
    )
    real = len(split.train) + len(split.val) + len(split.test)
    assert train.content["metrics"]["num-examples"] == real  # fedavg-weights = "real"
    augmented = client_app(
        make_message(
            RecordDict(
                {"arrays": weights, "config": task_record(**{"fedavg-weights": "augmented"})}
            ),
            "train.clf",
        ),
        context,
    )
    assert augmented.content["metrics"]["num-examples"] == len(split.train) + synthetic
    evaluation = client_app(
        make_message(
            RecordDict({"arrays": train.content["arrays"], "config": task_record()}),
            "evaluate.clf",
        ),
        context,
    )
    metrics = evaluation.content["metrics"]
    assert metrics["num-examples"] == len(split.test)  # no synthetic image in the test split
    # the metrics of the model it was sent, on its real test split
    trained = load_classifier(train.content["arrays"].to_torch_state_dict())
    expected = evaluate_classifier(
        trained, TensorData.from_digits(split.test), TINY["eval-batch-size"]
    )
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def test_classifier_without_imputation_state_refuses_to_train_silently_on_real_only():
    context = make_context(0, NUM_PARTITIONS)
    content = RecordDict(
        {"arrays": ArrayRecord(ExquisiteNetV1().state_dict()), "config": task_record()}
    )
    with pytest.raises(RuntimeError, match="imputation phase did not run"):
        client_app(make_message(content, "train.clf"), context)


def test_node_without_partition_config_gets_a_clear_error():
    context = make_context(0, NUM_PARTITIONS)
    context.node_config.clear()
    content = RecordDict({"arrays": ArrayRecord(CVAE().state_dict()), "config": task_record()})
    with pytest.raises(ValueError, match="partition-id"):
        client_app(make_message(content, "train.cvae"), context)


def test_same_message_same_seed_gives_identical_weights():
    initial = CVAE().state_dict()

    def train_once():
        content = RecordDict({"arrays": ArrayRecord(initial), "config": task_record()})
        return client_app(make_message(content, "train.cvae"), make_context(3, NUM_PARTITIONS))

    first = train_once().content["arrays"].to_torch_state_dict()
    torch.rand(17)  # disturb the global RNG: the handler must seed itself
    second = train_once().content["arrays"].to_torch_state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_train_message_asking_for_it_also_evaluates_the_received_model_first():
    context = make_context(*SMALL_CLIENT)
    impute(context, **{"num-synthetic": 20})
    received = ArrayRecord(ExquisiteNetV1().state_dict())

    def train(evaluate_received: bool):
        record = task_record()
        record["evaluate-received"] = evaluate_received
        content = RecordDict({"arrays": received, "config": record})
        return client_app(make_message(content, "train.clf"), context)

    plain, asked = train(False), train(True)
    assert "received-evaluation" not in plain.content
    evaluation = client_app(
        make_message(RecordDict({"arrays": received, "config": task_record()}), "evaluate.clf"),
        context,
    )
    # the same numbers as an evaluate message with that model ...
    assert dict(asked.content["received-evaluation"]) == dict(evaluation.content["metrics"])
    # ... and the same update as without the evaluation
    assert dict(asked.content["metrics"]) == dict(plain.content["metrics"])
    before, after = (r.content["arrays"].to_torch_state_dict() for r in (plain, asked))
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
