"""FedProx's proximal term on the client: the update it makes, by a hand-computed gradient,
and its anchor, the weights the client received."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedaug_flwr import node
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.data import Digits
from fedaug_flwr.models import ExquisiteNetV1
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import TensorData, frozen_parameters, proximal_penalty, train

X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, -2.0], [3.0, 1.0]])
Y = np.array([1.0, -0.5, 2.0, 0.0])
W, B = np.array([0.5, -1.0]), 0.2  # the weights the step starts from
W_GLOBAL, B_GLOBAL = np.array([0.0, 0.25]), 1.0  # the anchor: the weights received
LR, MU = 0.1, 0.3


def squared_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).squeeze(1) - y) ** 2).mean()


def linear(w: np.ndarray, b: float) -> nn.Linear:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w[None], dtype=torch.float32))
        model.bias.fill_(b)
    return model


def one_sgd_step(penalty) -> tuple[nn.Linear, float]:
    """One step of the one training loop: a single batch holding all four points."""
    model = linear(W, B)
    data = TensorData(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = train(model, data, squared_error, optimizer, 1, len(Y), seed=0, penalty=penalty)
    return model, loss


def test_one_sgd_step_with_the_proximal_term_follows_the_formula():
    # by hand: the gradient of mean((w.x + b - y)^2) is 2/N sum r x (and 2/N sum r for b)
    residual = X @ W + B - Y
    grad_w, grad_b = 2 * residual @ X / len(Y), 2 * residual.mean()
    anchor = {
        "weight": torch.tensor(W_GLOBAL[None], dtype=torch.float32),
        "bias": torch.tensor([B_GLOBAL], dtype=torch.float32),
    }

    plain, plain_loss = one_sgd_step(None)
    fedprox, fedprox_loss = one_sgd_step(proximal_penalty(anchor, MU))

    # FedAvg: w - lr * grad
    assert np.allclose(plain.weight.detach().numpy()[0], W - LR * grad_w, atol=1e-6)
    assert np.isclose(plain.bias.item(), B - LR * grad_b, atol=1e-6)
    # FedProx: w - lr * (grad + mu * (w - w_global))
    expected_w = W - LR * (grad_w + MU * (W - W_GLOBAL))
    expected_b = B - LR * (grad_b + MU * (B - B_GLOBAL))
    assert np.allclose(fedprox.weight.detach().numpy()[0], expected_w, atol=1e-6)
    assert np.isclose(fedprox.bias.item(), expected_b, atol=1e-6)
    # the reported loss is the data loss alone, before the step, with or without the term
    assert plain_loss == pytest.approx(float((residual**2).mean()), rel=1e-6)
    assert fedprox_loss == plain_loss


def test_the_penalty_is_half_mu_times_the_squared_distance_over_parameters_only():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    anchor = frozen_parameters(model)
    assert set(anchor) == {name for name, _ in model.named_parameters()}  # no BN buffers
    penalty = proximal_penalty(anchor, mu=0.5)
    assert penalty(model).item() == 0.0
    with torch.no_grad():
        model[0].bias.add_(torch.tensor([1.0, 2.0, 0.0]))
        model.get_buffer("1.running_mean").add_(5.0)  # a buffer moved: not a weight
    assert penalty(model).item() == pytest.approx(0.25 * (1 + 4))
    # the anchor is a copy: moving the model does not move it
    assert not torch.equal(anchor["0.bias"], model[0].bias)


FEDPROX = {"clf-strategy": "fedprox"}  # proximal-mu > 0 is FedProx's, and only FedProx's


def test_proximal_mu_is_validated_and_refused_with_local_finetuning():
    assert AppConfig.from_run_config({}).proximal_mu == 0.0
    assert AppConfig.from_run_config({**FEDPROX, "proximal-mu": 1}).proximal_mu == 1.0
    with pytest.raises(ConfigError, match=r"'proximal-mu' must be a number >= 0"):
        AppConfig.from_run_config({"proximal-mu": -0.1})
    with pytest.raises(ConfigError, match=r"proximal-mu=0.01 .* pretrain='local'"):
        AppConfig.from_run_config({**FEDPROX, "proximal-mu": 0.01, "pretrain": "local"})
    with pytest.raises(ConfigError, match=r"proximal-mu=0.01 belong\(s\) to clf-strategy"):
        AppConfig.from_run_config({"proximal-mu": 0.01})  # FedProx under FedAvg's name
    assert AppConfig.from_run_config({**FEDPROX, "proximal-mu": 0.01, "pretrain": "federated"})


def _training_set(count: int = 8) -> TensorData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2, (count, 28, 28), dtype=np.uint8)
    return TensorData.from_digits(Digits(images, np.arange(count) % 10))


def test_the_client_anchors_the_term_at_the_weights_it_received(monkeypatch):
    """node.train_classifier hands the loop a penalty that is 0 at the received weights
    and (mu / 2) ||delta||^2 away from them."""
    task = TaskConfig(AppConfig.from_run_config({**FEDPROX, "proximal-mu": 0.4}), "mnist-5k", "")
    torch.manual_seed(0)
    received = {k: v.clone() for k, v in ExquisiteNetV1().state_dict().items()}
    seen = {}

    def no_training(model, *args, penalty=None, **kwargs):
        seen["penalty"], seen["model"] = penalty, model
        return 0.0

    monkeypatch.setattr(node, "train", no_training)
    node.train_classifier(task, _training_set(), received, 1, 0, epochs=1)
    penalty, model = seen["penalty"], seen["model"]
    assert penalty(model).item() == 0.0
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # 10 outputs moved by 1 each
    assert penalty(model).item() == pytest.approx(0.2 * 10)
    assert not torch.equal(received["head.5.bias"], model.head[-1].bias)  # a copy, untouched

    plain = TaskConfig(AppConfig.from_run_config({}), "mnist-5k", "")
    node.train_classifier(plain, _training_set(), received, 1, 0, epochs=1)
    assert seen["penalty"] is None  # FedAvg's objective: no term at all


def strategy_of(mu: float) -> dict:
    return FEDPROX if mu > 0 else {}


@pytest.mark.usefixtures("in_process_run")  # one torch thread: 2 cores shared
def test_a_strong_proximal_term_keeps_the_client_near_the_received_weights():
    settings = {"clf-optimizer": "sgd", "clf-momentum": 0.0, "clf-weight-decay": 0.0}
    torch.manual_seed(0)
    received = {k: v.clone() for k, v in ExquisiteNetV1().state_dict().items()}

    def drift(mu: float) -> float:
        task = TaskConfig(
            AppConfig.from_run_config(
                {**settings, **strategy_of(mu), "proximal-mu": mu, "clf-batch-size": 2}
            ),
            "mnist-5k",
            "",
        )
        weights, _ = node.train_classifier(task, _training_set(6), received, 1, 0, epochs=1)
        return sum(
            float(((weights[name] - received[name]) ** 2).sum())
            for name, _ in ExquisiteNetV1().named_parameters()
        )

    # three SGD steps; from the second on, each pulls the drift back by lr * mu = 0.5
    assert drift(50.0) < 0.5 * drift(0.0)
