"""The classifier's server strategy (``clf-strategy``): Flower's FedProx, FedAvgM and FedAdam
behind the routed mixin.

- FedAvgM's and FedAdam's server updates are their formulas, hand-computed over two rounds
  of a one-array model whose clients move it by known amounts (the mixin's reply checks,
  routing and logs in between);
- each strategy runs the real pipeline and ClientApp (``LocalGrid``) at a tiny size, with
  evaluation on receipt, with imputation and with the finetune variant; FedProx's
  ``proximal-mu`` reaches the client's proximal term through the train message;
- combinations that make no sense are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedProx

import client_app
from fedaug_flwr import node
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    PROXIMAL_MU,
    TRAIN_CLASSIFIER,
    TaskConfig,
)
from fedaug_flwr.strategies import (
    RoutedFedAdam,
    RoutedFedAvg,
    RoutedFedAvgM,
    RoutedFedProx,
    routed_strategy,
)
from tests.local_grid import LocalGrid, set_task_identity
from tests.test_checked_replies import own_data_nodes, run, write_node_files

pytestmark = pytest.mark.usefixtures("in_process_run")

# ------------------------------------------------------------------ the server updates

W0 = np.array([0.5, -1.0, 2.0], dtype=np.float32)
# What each client adds to the model it receives, per round; FedAvg weights them by
# num-examples, so each round's mean moves the received model by D[r].
STEPS = {0: np.array([0.1, 0.2, -0.3]), 1: np.array([-0.2, 0.05, 0.1])}
EXAMPLES = {0: 30, 1: 10}
D = {r: (EXAMPLES[0] * STEPS[0] + EXAMPLES[1] * STEPS[1]) * r / 40 for r in (1, 2)}


def moving_clients(message: Message, context) -> Message:
    """A client that adds its step (times the round) to the received model."""
    partition = context.node_config["partition-id"]
    server_round = int(message.content[CONFIG]["server-round"])
    update = {
        name: Array((array.numpy() + STEPS[partition] * server_round).astype(np.float32))
        for name, array in message.content[ARRAYS].items()
    }
    metrics = {"train-loss": 1.0, "num-examples": EXAMPLES[partition], "partition-id": partition}
    content = RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


def two_rounds(strategy: str, **parameters: float) -> tuple[np.ndarray, LocalGrid]:
    grid = LocalGrid(moving_clients, [{"partition-id": 0}, {"partition-id": 1}])
    routed = routed_strategy(
        "fedavg",
        "clf",
        strategy=strategy,
        strategy_parameters=parameters,
        min_replies=2,
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_evaluate_nodes=0,
        min_available_nodes=2,
        averaged=["running-var"],  # like BatchNorm's statistics: averaged, never stepped
    )
    initial = ArrayRecord({"w": Array(W0.copy()), "running-var": Array(W0.copy())})
    result = routed.start(grid, initial, num_rounds=2, timeout=10)
    assert [len(routed.train_log[r].per_client) for r in (1, 2)] == [2, 2]  # checked replies
    assert {kind for _, kind in grid.delivered} == {TRAIN_CLASSIFIER}  # routed messages
    # the averaged array is FedAvg's: the received one moved by each round's mean update
    w, averaged = result.arrays["w"].numpy(), result.arrays["running-var"].numpy()
    assert np.allclose(averaged, W0 + D[1] + D[2], atol=1e-6)
    return w, grid


def test_fedavgm_server_update_is_momentum_sgd_on_the_pseudo_gradient():
    lr, momentum = 0.7, 0.9
    w, _ = two_rounds("fedavgm", server_learning_rate=lr, server_momentum=momentum)
    # round 1: v1 = w0 - mean1 = -D1, w1 = w0 - lr v1
    v1 = -D[1]
    w1 = W0 - lr * v1
    # round 2: mean2 = w1 + D2, v2 = momentum v1 + (w1 - mean2), w2 = w1 - lr v2
    v2 = momentum * v1 - D[2]
    expected = w1 - lr * v2
    assert np.allclose(w, expected, atol=1e-6)
    assert not np.allclose(w, W0 + D[1] + D[2], atol=1e-3)  # not plain FedAvg


def test_fedadam_server_update_is_adam_on_the_mean_update():
    eta, tau, b1, b2 = 0.1, 1e-3, 0.9, 0.99
    w, _ = two_rounds("fedadam", eta=eta, tau=tau, beta_1=b1, beta_2=b2)
    w0 = W0.astype(np.float64)
    # round t: delta = mean_t - w_(t-1) = D_t; Flower's step eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
    m1 = (1 - b1) * D[1]
    v1 = (1 - b2) * D[1] ** 2
    w1 = w0 + eta * np.sqrt(1 - b2**2) / (1 - b1**2) * m1 / (np.sqrt(v1) + tau)
    m2 = b1 * m1 + (1 - b1) * D[2]
    v2 = b2 * v1 + (1 - b2) * D[2] ** 2
    expected = w1 + eta * np.sqrt(1 - b2**3) / (1 - b1**3) * m2 / (np.sqrt(v2) + tau)
    assert w.dtype == np.float32  # the model keeps its dtype (Flower's step is float64)
    assert np.allclose(w, expected, atol=1e-5)
    assert not np.allclose(w, W0 + D[1] + D[2], atol=1e-3)


def test_the_strategy_classes_are_flowers_behind_the_mixin():
    # RoutedFedAvg first (routing, checks, logs), then Flower's class, unchanged
    assert RoutedFedAvgM.__mro__[1:3] == (RoutedFedAvg, FedAvgM)
    assert RoutedFedProx.__mro__[1:3] == (RoutedFedAvg, FedProx)
    assert RoutedFedAdam.__mro__[1:3] == (RoutedFedAvg, FedAdam)


# ------------------------------------------------------------------ the real pipeline

TWO_ROUNDS = {"clf-rounds": 2}  # round 1's model is evaluated on receipt in round 2
SETTINGS = {
    "fedavg": {},
    "fedprox": {"proximal-mu": 0.5},
    "fedavgm": {"clf-fedavgm-momentum": 0.9},
    "fedadam": {},
}


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> list[str]:
    return write_node_files(tmp_path_factory.mktemp("node-data"), 3)


class Recording:
    """The real ClientApp; it keeps the ``proximal-mu`` of every train.clf message."""

    def __init__(self) -> None:
        self.proximal_mu: list[float] = []

    def __call__(self, message: Message, context) -> Message:
        if message.metadata.message_type == TRAIN_CLASSIFIER:
            self.proximal_mu.append(message.content[CONFIG][PROXIMAL_MU])
        return client_app.app(message, context)


@pytest.fixture(scope="module")
def fedavg_weights(node_files, tmp_path_factory) -> dict:
    """The classifier FedAvg makes of the same clients (run before any test's fixture)."""
    set_task_identity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("fedavg")
        _, weights = run(folder, own_data_nodes(node_files, 3), **TWO_ROUNDS)
    finally:
        torch.set_num_threads(threads)
    return weights


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam"])
def test_each_strategy_through_the_pipeline(
    strategy, node_files, fedavg_weights, tmp_path, monkeypatch
):
    mus: list[float] = []
    penalty = node.proximal_penalty

    def recorded_penalty(anchor, mu):
        mus.append(mu)
        return penalty(anchor, mu)

    monkeypatch.setattr(node, "proximal_penalty", recorded_penalty)
    app = Recording()
    settings = {"clf-strategy": strategy, **SETTINGS[strategy], **TWO_ROUNDS}
    summary, weights = run(tmp_path, own_data_nodes(node_files, 3), app=app, **settings)

    assert summary["config"]["clf-strategy"] == strategy
    section = summary["classifier"]
    assert section["strategy"]["name"] == strategy
    assert section["federated-evaluation"] == "on receipt"
    assert [r["round"] for r in section["rounds"]] == [1, 2]
    for row in section["rounds"]:  # every model evaluated by every client, none failed
        assert len(row["evaluate-per-client"]) == 3 and not row["failures"]
        assert "global-test" in row
    assert [row["round"] for row in section["round-timing-s"]] == [0, 1, 2]
    assert len(summary["final"]["clients"]) > 0
    # the strategy changed the global model: not FedAvg's
    moved = sum(
        float((weights[k].double() - fedavg_weights[k].double()).abs().sum()) for k in weights
    )
    assert moved > 1e-3
    if strategy == "fedprox":
        section_mu = section["strategy"]["proximal-mu"]
        # Flower's FedProx wrote mu into each train message, and each client's term used it
        assert app.proximal_mu == [section_mu] * 6
        assert mus == [section_mu] * 6
    else:
        assert mus == [] and app.proximal_mu == [0.0] * 6


def test_fedprox_with_imputation_and_fedavgm_with_the_finetune_variant(node_files, tmp_path):
    nodes = own_data_nodes(node_files, 3)
    imputed = {
        "imputation": "minority",
        "num-synthetic": 10,
        "clf-strategy": "fedprox",
        "proximal-mu": 0.1,
    }
    summary, _ = run(tmp_path, nodes, name="imputed", **imputed)
    assert summary["classifier"]["strategy"] == {"name": "fedprox", "proximal-mu": 0.1}
    assert summary["imputation"]["total-synthetic"] == 30

    finetune = {
        "pretrain": "federated",
        "pretrain-samples": 40,
        "pretrain-epochs": 1,
        "finetune-rounds": 2,
        "finetune-local-epochs": 1,
        "clf-strategy": "fedavgm",
        "clf-fedavgm-momentum": 0.5,
    }
    summary, _ = run(tmp_path, nodes, name="finetune", **finetune)
    assert summary["classifier"]["strategy"] == {
        "name": "fedavgm",
        "server-lr": 1.0,
        "server-momentum": 0.5,
    }
    assert len(summary["classifier"]["rounds"]) == 2
    assert summary["final"]["model"] == "finetuned"


# ------------------------------------------------------------------ refused by name


def test_defaults_are_flowers_and_recorded():
    config = AppConfig.from_run_config({})
    assert config.clf_strategy == "fedavg"
    assert (config.clf_fedavgm_lr, config.clf_fedavgm_momentum) == (1.0, 0.0)
    adam = (config.clf_fedadam_eta, config.clf_fedadam_tau)
    assert adam == (0.1, 0.001)
    assert (config.clf_fedadam_beta1, config.clf_fedadam_beta2) == (0.9, 0.99)
    assert config.to_run_config()["clf-strategy"] == "fedavg"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clf-strategy": "fedsgd"}, r"'clf-strategy' must be one of \['fedavg', 'fedprox'"),
        ({"clf-strategy": "fedprox"}, r"clf-strategy='fedprox' with proximal-mu=0.0 is FedAvg"),
        ({"proximal-mu": 0.01}, r"proximal-mu=0.01 belong\(s\) to clf-strategy='fedprox'"),
        (
            {"clf-strategy": "fedavgm", "proximal-mu": 0.01, "clf-fedavgm-momentum": 0.9},
            r"proximal-mu=0.01 .* but clf-strategy='fedavgm'",
        ),
        ({"clf-strategy": "fedavgm"}, r"clf-strategy='fedavgm' with clf-fedavgm-lr=1.0 and"),
        ({"clf-fedavgm-momentum": 0.9}, r"clf-fedavgm-momentum=0.9 belong\(s\) to .*'fedavgm'"),
        (
            {"clf-strategy": "fedprox", "proximal-mu": 0.1, "clf-fedadam-eta": 0.01},
            r"clf-fedadam-eta=0.01 belong\(s\) to clf-strategy='fedadam'",
        ),
        (
            {"clf-strategy": "fedadam", "clf-aggregation": "krum"},
            r"clf-aggregation='krum' .* clf-strategy='fedadam'",
        ),
        (
            {"clf-strategy": "fedavgm", "clf-fedavgm-momentum": 0.9, "pretrain": "local"},
            r"clf-strategy='fedavgm' .* pretrain='local' .* no server aggregation",
        ),
        ({"clf-fedadam-beta2": 1.0}, r"'clf-fedadam-beta2' must be a number in \[0, 1\)"),
        ({"clf-fedadam-tau": 0.0}, r"'clf-fedadam-tau' must be a number > 0"),
        ({"clf-fedavgm-lr": -1.0}, r"'clf-fedavgm-lr' must be a number > 0"),
    ],
)
def test_bad_combinations_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.from_run_config(settings)


def test_good_combinations_are_accepted():
    for settings in (
        {"clf-strategy": "fedprox", "proximal-mu": 0.01, "pretrain": "federated"},
        {"clf-strategy": "fedavgm", "clf-fedavgm-lr": 0.5},
        {"clf-strategy": "fedadam", "clf-fedadam-eta": 0.01, "imputation": "minority"},
        {"clf-aggregation": "krum", "clf-strategy": "fedavg"},
    ):
        assert AppConfig.from_run_config(settings).clf_strategy == settings["clf-strategy"]


def test_a_client_refuses_a_train_message_whose_mu_contradicts_its_strategy():
    """The client re-validates the message's config: a ``proximal-mu`` that a FedAvg run
    did not set cannot slip a proximal term into its training."""
    record = TaskConfig(AppConfig.from_run_config({}), "mnist-5k", "").to_record()
    record[PROXIMAL_MU] = 0.3
    with pytest.raises(ConfigError, match=r"proximal-mu=0.3 belong\(s\) to clf-strategy"):
        TaskConfig.from_record(record)
