"""DP-SGD for the CVAE (Opacus) and client-level accounting (Flower): clipping, the
accountants' numbers against the libraries' own, budget errors, the wrappers' limits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedaug_flwr import dp
from fedaug_flwr.models import CVAE, cvae_loss
from fedaug_flwr.training import TensorData


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tests share two cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def squared_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).squeeze(1) - y) ** 2).mean()


def test_with_no_noise_a_step_is_the_mean_of_clipped_per_sample_gradients():
    """One full-batch step (rate 1) of SGD with lr 1 and noise 0 moves the weights by
    minus the mean of the per-sample gradients, each clipped to norm C by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    x, y = torch.randn(8, 5) * 3, torch.randn(8) * 3
    before = [p.detach().clone() for p in model.parameters()]
    per_sample = []
    for i in range(8):
        model.zero_grad()
        squared_error(model, x[i : i + 1], y[i : i + 1]).backward()
        per_sample.append([p.grad.detach().clone() for p in model.parameters()])
    norms = [float(torch.sqrt(sum((g**2).sum() for g in grads))) for grads in per_sample]
    clip = sorted(norms)[4]  # some samples are clipped, some not
    expected = [torch.zeros_like(p) for p in before]
    for grads, norm in zip(per_sample, norms, strict=True):
        factor = min(1.0, clip / (norm + 1e-6))  # Opacus' flat clipping
        for e, g in zip(expected, grads, strict=True):
            e += factor * g / 8
    assert max(norms) > clip > min(norms)
    model.zero_grad()
    result = dp.train_private(
        model,
        TensorData(x, y),
        squared_error,
        torch.optim.SGD(model.parameters(), lr=1.0),
        epochs=1,
        batch_size=8,
        seed=0,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        delta=1e-5,
    )
    assert (result.sample_rate, result.steps) == (1.0, 1)
    assert math.isinf(result.epsilon)
    for b, p, e in zip(before, model.parameters(), expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-5, atol=1e-6)


def test_one_sample_moves_the_model_by_at_most_its_clipping_norm():
    """A single image with a huge gradient: the update is bounded by lr * C / batch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.tensor([[100.0, -50.0, 30.0, 80.0]]), torch.tensor([1e4])
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    dp.train_private(
        model,
        TensorData(x, y),
        squared_error,
        torch.optim.SGD(model.parameters(), lr=1.0),
        epochs=1,
        batch_size=1,
        seed=0,
        noise_multiplier=0.0,
        max_grad_norm=0.25,
        delta=1e-5,
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.25, rel=1e-4)


def test_the_cvae_trains_with_dp_sgd_and_is_left_as_it_was():
    """Opacus' hooks on the CVAE work, come off again, the state dict keeps its keys, and
    the epsilon of training equals the offline accountant's, round after round."""
    torch.manual_seed(0)
    model = CVAE()
    keys = list(model.state_dict())
    images = (torch.rand(40, 1, 28, 28) < 0.2).float()
    data = TensorData(images, torch.randint(0, 10, (40,)))
    first = dp.train_private(
        model,
        data,
        cvae_loss,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        epochs=2,
        batch_size=16,
        seed=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
    )
    assert math.isfinite(first.loss)
    assert (first.sample_rate, first.steps) == (1 / 3, 6)  # ceil(40 / 16) = 3 steps per epoch
    assert list(model.state_dict()) == keys
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for parameter in model.parameters():
        assert not hasattr(parameter, "grad_sample") and not hasattr(parameter, "summed_grad")
    second = dp.train_private(
        model,
        data,
        cvae_loss,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        epochs=2,
        batch_size=16,
        seed=2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        prior_steps=first.total_steps,
    )
    assert second.total_steps == 12
    offline = dp.epsilon_per_round(1.0, 40, 16, local_epochs=2, rounds=2, delta=1e-5)
    assert [first.epsilon, second.epsilon] == pytest.approx(offline, rel=1e-9)
    assert first.metrics()["dp-epsilon"] == first.epsilon


def test_empty_poisson_batches_still_step_and_count():
    torch.manual_seed(0)
    model = CVAE()
    data = TensorData((torch.rand(20, 1, 28, 28) < 0.2).float(), torch.randint(0, 10, (20,)))
    sizes = [
        len(labels)
        for _, labels in dp.poisson_batches(1 / 20, 20)(data, 1, torch.Generator().manual_seed(3))
    ]
    assert 0 in sizes  # rate 1/20 over 20 images: about a third of the batches are empty
    result = dp.train_private(
        model,
        data,
        cvae_loss,
        torch.optim.SGD(model.parameters(), lr=1e-3),
        epochs=1,
        batch_size=1,
        seed=3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
    )
    assert result.steps == 20
    assert math.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sample_level_epsilon_is_opacus_own():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    accountant = RDPAccountant()
    for _ in range(300):
        accountant.step(noise_multiplier=1.1, sample_rate=0.05)
    orders = RDPAccountant.DEFAULT_ALPHAS
    by_hand, _ = rdp.get_privacy_spent(
        orders=orders,
        rdp=rdp.compute_rdp(q=0.05, noise_multiplier=1.1, steps=300, orders=orders),
        delta=1e-5,
    )
    ours = dp.sample_level_epsilon(1.1, 0.05, 300, 1e-5)
    assert ours == accountant.get_epsilon(delta=1e-5)
    assert ours == pytest.approx(float(by_hand), rel=1e-12)
    assert dp.sample_level_epsilon(1.1, 0.05, 0, 1e-5) == 0.0


def test_client_level_epsilon_is_flowers_and_dp_accountings_own():
    from dp_accounting import dp_event, rdp
    from flwr.serverapp import GaussianPrivacyEvent

    flower = dp.client_level_accountant(delta=1e-5, num_clients=100)
    for _ in range(15):  # what the DP wrapper composes, one release per round
        flower.compose(GaussianPrivacyEvent(1.3, 100, 100))
    library = rdp.RdpAccountant()
    library.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.3), 15))
    ours = dp.client_level_epsilon(1.3, rounds=15, delta=1e-5, num_clients=100)
    assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=1e-12)
    assert ours == pytest.approx(library.get_epsilon(1e-5), rel=1e-12)
    # without amplification the number of clients does not matter
    assert dp.client_level_epsilon(1.3, 15, 1e-5, num_clients=1) == pytest.approx(ours, rel=1e-12)


def test_a_budget_that_training_would_exceed_is_refused_with_its_numbers():
    settings = dict(delta=1e-5, noise_multiplier=0.8, num_images=320, batch_size=32)
    spent = dp.check_sample_budget(target_epsilon=1e6, local_epochs=1, rounds=15, **settings)
    with pytest.raises(dp.PrivacyBudgetError) as error:
        dp.check_sample_budget(target_epsilon=spent / 2, local_epochs=1, rounds=15, **settings)
    message = str(error.value)
    for number in (
        f"epsilon={spent:.3f}",
        "delta=1e-05",
        "noise multiplier 0.8",
        "320 training",
        "batch size 32",
        "15 round(s)",
        "150 steps",
        f"={spent / 2:g}",
    ):
        assert number in message

    client_spent = dp.client_level_epsilon(2.0, 15, 1e-5)
    with pytest.raises(dp.PrivacyBudgetError, match=rf"epsilon={client_spent:.3f}.*15 CVAE"):
        dp.check_client_budget(target_epsilon=4.0, delta=1e-5, noise_multiplier=2.0, rounds=15)
    assert dp.check_client_budget(
        target_epsilon=client_spent, delta=1e-5, noise_multiplier=2.0, rounds=15
    ) == pytest.approx(client_spent)


def test_noise_derived_from_a_budget_keeps_it():
    settings = dict(delta=1e-5, num_images=320, batch_size=32, local_epochs=1, rounds=15)
    noise = dp.sample_noise_for_budget(target_epsilon=4.0, **settings)
    spent = dp.check_sample_budget(target_epsilon=4.0, noise_multiplier=noise, **settings)
    assert 4.0 - dp.EPSILON_TOLERANCE <= spent <= 4.0

    client_noise = dp.client_noise_for_budget(target_epsilon=8.0, delta=1e-5, rounds=15)
    assert 8.0 - 0.01 <= dp.client_level_epsilon(client_noise, 15, 1e-5) <= 8.0


def test_client_noise_is_what_flowers_wrappers_add():
    assert dp.client_noise_stdv(1.5, 0.2, 100) == pytest.approx(1.5 * 0.2 / 100)


def test_flowers_accounted_dp_wrapper_refuses_the_routed_strategy():
    """The limit docs/privacy.md plans around: Flower's accountant only goes with a
    strategy whose aggregate_train is FedAvg's, which RoutedFedAvg overrides."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from fedaug_flwr.strategies import RoutedFedAvg

    with pytest.raises(ValueError, match="FedAvg.aggregate_train"):
        DifferentialPrivacyServerSideFixedClipping(
            RoutedFedAvg("cvae"), 1.0, 1.0, 3, accountant=dp.client_level_accountant(1e-5, 3)
        )
    # a plain FedAvg, and RoutedFedAvg without Flower's accountant, are accepted
    DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), 1.0, 1.0, 3, accountant=dp.client_level_accountant(1e-5, 3)
    )
    DifferentialPrivacyServerSideFixedClipping(RoutedFedAvg("cvae"), 1.0, 1.0, 3)
