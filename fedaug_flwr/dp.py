"""Differential privacy for the CVAE: sample-level DP-SGD on a client (Opacus) and the
client-level accounting of DP-FedAvg (Flower's wrappers and Flower's accountant).

Sample level (``cvae-dp = "sample"``): a client's local CVAE epochs run DP-SGD. Each
step draws a Poisson sample of the client's training images (each image with
probability ``q = 1 / ceil(n / batch_size)``, as Opacus' ``DPDataLoader`` does),
clips every image's gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` to their sum (Opacus'
``PrivacyEngine.make_private``; ``cvae_loss`` is a per-image mean, so
``loss_reduction="mean"`` is right). The privacy unit is one training image of one
client; the epsilon a client has spent after ``r`` rounds is that of ``r * local
epochs * ceil(n / batch_size)`` sampled Gaussian steps (RDP accountant). Averaging
by the server, later rounds and generating images are post-processing and adaptive
composition, which the accountant covers. The CVAE's layers (Linear, ReLU, softplus,
sigmoid; no BatchNorm) all have per-sample gradients in Opacus.

Client level (``cvae-dp = "client"``): one client's whole data is the unit; each
round clips each client's model update to ``clip`` and adds ``N(0, (z * clip /
m)^2)`` to the average of the ``m`` sampled clients (Flower's
``DifferentialPrivacyServerSideFixedClipping``, or the client-side variant with
``fixedclipping_mod``). :func:`client_level_epsilon` is the epsilon Flower's own
``RdpAccountant`` reports for it (no amplification by sampling, add-or-remove-one
neighbours: what the wrappers' accounted mode requires). The wiring that is and is
not feasible with this app's strategy is in ``docs/privacy.md``.

Nothing here knows about Flower messages; it is wired into the app's client and
server by the caller.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Opacus calls logging.basicConfig when imported (opacus.utils.module_utils), which gives the
# root logger a handler of its own: every line of Flower's logger, which propagates, was then
# printed twice (and the launcher counted each round twice). Its handler is removed again.
_ROOT_HANDLERS = list(logging.getLogger().handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

for _handler in list(logging.getLogger().handlers):
    if _handler not in _ROOT_HANDLERS:
        logging.getLogger().removeHandler(_handler)

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedaug_flwr.training import LossFn, TensorData, train  # noqa: E402

ACCOUNTANT = "rdp"  # Opacus' RDP accountant; Flower's client-level accountant is RDP too
EPSILON_TOLERANCE = 0.01  # of the noise search for a budget (Opacus' default)


class PrivacyBudgetError(ValueError):
    """Training would spend more than the privacy budget (epsilon at delta) allows."""


# ------------------------------------------------------------------- sample level


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Poisson-sampled steps in one epoch: ``ceil(n / batch_size)`` (Opacus: the length
    of the data loader it replaces)."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"need images and a batch size >= 1; got {num_images}, {batch_size}")
    return math.ceil(num_images / batch_size)


def sample_rate(num_images: int, batch_size: int) -> float:
    """Each image's chance to be in a step's batch: ``1 / steps_per_epoch`` (as Opacus'
    ``make_private`` computes it). A client with ``n <= batch_size`` has rate 1: no
    amplification by sampling."""
    return 1.0 / steps_per_epoch(num_images, batch_size)


def sample_level_epsilon(
    noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str = ACCOUNTANT
) -> float:
    """Epsilon at ``delta`` after ``steps`` sampled Gaussian steps (Opacus' accountant,
    computed offline: the same numbers as the accountant attached to training)."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    account = _accountant(accountant)
    account.history = [(noise_multiplier, rate, steps)]
    return float(account.get_epsilon(delta=delta))


def epsilon_per_round(
    noise_multiplier: float,
    num_images: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    delta: float,
) -> list[float]:
    """A client's cumulative epsilon at ``delta`` after each of ``rounds`` CVAE rounds."""
    rate = sample_rate(num_images, batch_size)
    per_round = local_epochs * steps_per_epoch(num_images, batch_size)
    return [
        sample_level_epsilon(noise_multiplier, rate, r * per_round, delta)
        for r in range(1, rounds + 1)
    ]


def check_sample_budget(
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    num_images: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
) -> float:
    """The epsilon a client spends over all ``rounds``; :class:`PrivacyBudgetError`,
    naming the numbers, if it exceeds ``target_epsilon`` (checked before training)."""
    rate = sample_rate(num_images, batch_size)
    steps = rounds * local_epochs * steps_per_epoch(num_images, batch_size)
    epsilon = sample_level_epsilon(noise_multiplier, rate, steps, delta)
    if epsilon > target_epsilon:
        raise PrivacyBudgetError(
            f"sample-level DP-SGD would spend epsilon={epsilon:.3f} at delta={delta:g}, more "
            f"than the budget cvae-dp-epsilon={target_epsilon:g}: noise multiplier "
            f"{noise_multiplier:g}, {num_images} training images, batch size {batch_size} "
            f"(sampling rate {rate:.4g}), {rounds} round(s) x {local_epochs} local epoch(s) "
            f"= {steps} steps. Raise cvae-dp-noise, or set it to 0 to derive the noise from "
            "the budget, or train fewer rounds/epochs"
        )
    return epsilon


def sample_noise_for_budget(
    *,
    target_epsilon: float,
    delta: float,
    num_images: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
) -> float:
    """The smallest noise multiplier (within Opacus' search tolerance) whose epsilon after
    all rounds stays within ``target_epsilon`` (Opacus' ``get_noise_multiplier``)."""
    steps = rounds * local_epochs * steps_per_epoch(num_images, batch_size)
    with warnings.catch_warnings():  # the search's large trial noises hit the largest order
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate(num_images, batch_size),
                steps=steps,
                accountant=ACCOUNTANT,
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )


def poisson_batches(
    rate: float, steps: int
) -> Callable[[TensorData, int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A ``batches`` argument for :func:`fedaug_flwr.training.train`: ``steps`` batches per
    epoch, each image in each with probability ``rate`` (Opacus' own sampler, driven by
    the loop's seeded generator). A batch may be empty; DP-SGD still steps (noise only)."""

    def batches(data: TensorData, _batch_size: int, generator: torch.Generator):
        sampler = UniformWithReplacementSampler(
            num_samples=len(data), sample_rate=rate, generator=generator, steps=steps
        )
        for index in sampler:
            index = torch.as_tensor(index, dtype=torch.long, device=data.labels.device)
            yield data.images[index], data.labels[index]

    return batches


def empty_batch_safe(loss_fn: LossFn) -> LossFn:
    """``loss_fn``, but 0 on an empty batch (a per-image mean over no images is 0/0).

    The model still runs forward on the empty batch, so Opacus sees per-sample
    gradients of batch size 0 and the step adds noise as the accountant assumes."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = loss_fn(model, images, labels)
        return torch.nan_to_num(value, nan=0.0) if len(labels) == 0 else value

    return loss


@dataclass(frozen=True)
class PrivateTrainingResult:
    """What one client's DP-SGD training reports (all of it may leave the client)."""

    loss: float
    epsilon: float  # cumulative, at ``delta``, including ``prior_steps``
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # this call's
    total_steps: int  # prior_steps + steps

    def metrics(self) -> dict[str, float | int]:
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise": self.noise_multiplier,
            "dp-clip": self.max_grad_norm,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.total_steps,
        }


def train_private(
    model: nn.Module,
    data: TensorData,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    prior_steps: int = 0,
) -> PrivateTrainingResult:
    """:func:`fedaug_flwr.training.train` with DP-SGD: Opacus' ``make_private`` attaches
    per-sample gradient hooks to ``model`` (not wrapped: its state dict keeps its keys)
    and wraps ``optimizer``; batches are Poisson samples; the hooks are removed again
    before returning, so a reused model object trains normally afterwards.

    ``prior_steps``: the DP-SGD steps this client took in earlier rounds with the same
    noise and sampling rate, so that the returned epsilon is cumulative.
    ``noise_multiplier`` 0 trains with clipping only (epsilon infinite).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    per_epoch = steps_per_epoch(len(data), batch_size)
    index_loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch_size)
    engine = _privacy_engine()
    if prior_steps > 0:
        engine.accountant.history = [
            (noise_multiplier, sample_rate(len(data), batch_size), prior_steps)
        ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Optimal order).*")
        hooks, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=index_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            loss_reduction="mean",
            poisson_sampling=True,
            noise_generator=torch.Generator(device=_device_of(model)).manual_seed(seed + 1),
            wrap_model=False,
        )
    rate = private_loader.sample_rate
    try:
        with warnings.catch_warnings():
            # Opacus' hook on the first layer, whose input (the images) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = train(
                model,
                data,
                empty_batch_safe(loss_fn),
                private_optimizer,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                batches=poisson_batches(rate, per_epoch),
            )
    finally:
        hooks.cleanup()
        for parameter in model.parameters():  # the DP optimizer's per-parameter buffers
            for name in ("summed_grad", "grad_sample"):
                if hasattr(parameter, name):
                    delattr(parameter, name)
    total = sum(steps for _, _, steps in engine.accountant.history)
    epsilon = math.inf if noise_multiplier <= 0 or total == 0 else engine.get_epsilon(delta=delta)
    return PrivateTrainingResult(
        loss=loss,
        epsilon=float(epsilon),
        delta=delta,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=rate,
        steps=total - prior_steps,
        total_steps=total,
    )


def _accountant(name: str) -> RDPAccountant:
    if name != "rdp":
        raise ValueError(f"only the RDP accountant is used here; got {name!r}")
    return RDPAccountant()


def _privacy_engine() -> PrivacyEngine:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        return PrivacyEngine(accountant=ACCOUNTANT)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------- client level


def client_level_accountant(delta: float, num_clients: int, max_epsilon: float | None = None):
    """Flower's ``RdpAccountant`` (``flwr[dp]``) as the DP wrappers' accounted mode needs
    it: no amplification by sampling, add-or-remove-one client neighbours."""
    from flwr.serverapp import (
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )


def client_level_epsilon(
    noise_multiplier: float, rounds: int, delta: float, num_clients: int = 1
) -> float:
    """Epsilon at ``delta`` after ``rounds`` DP-FedAvg rounds with noise multiplier ``z``
    (noise ``z * clip / m`` on the mean of ``m`` clipped updates), all clients sampled
    (fraction 1.0): what Flower's accountant reports after composing one
    ``GaussianPrivacyEvent`` per round. Without amplification the number of clients
    does not change it."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from flwr.serverapp import GaussianPrivacyEvent

    accountant = client_level_accountant(delta, num_clients)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, num_clients, num_clients), rounds)
    return float(accountant.get_epsilon(delta))


def check_client_budget(
    *, target_epsilon: float, delta: float, noise_multiplier: float, rounds: int
) -> float:
    """The client-level epsilon after all ``rounds``; :class:`PrivacyBudgetError`, naming
    the numbers, if it exceeds ``target_epsilon``."""
    epsilon = client_level_epsilon(noise_multiplier, rounds, delta)
    if epsilon > target_epsilon:
        raise PrivacyBudgetError(
            f"client-level DP-FedAvg would spend epsilon={epsilon:.3f} at delta={delta:g} "
            f"over {rounds} CVAE round(s) with noise multiplier {noise_multiplier:g}, more "
            f"than the budget cvae-dp-epsilon={target_epsilon:g}. Raise cvae-dp-noise, or "
            "set it to 0 to derive the noise from the budget, or train fewer rounds"
        )
    return epsilon


def client_noise_for_budget(
    *, target_epsilon: float, delta: float, rounds: int, tolerance: float = EPSILON_TOLERANCE
) -> float:
    """The smallest noise multiplier (bisection, to ``tolerance`` in epsilon) whose
    client-level epsilon after ``rounds`` stays within ``target_epsilon``."""
    low, high = 0.0, 1.0
    while client_level_epsilon(high, rounds, delta) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivacyBudgetError(
                f"no noise multiplier reaches epsilon={target_epsilon:g} at delta={delta:g}"
            )
    while True:
        middle = (low + high) / 2
        epsilon = client_level_epsilon(middle, rounds, delta) if middle > 0 else math.inf
        if epsilon > target_epsilon:
            low = middle
        else:
            high = middle
            if target_epsilon - epsilon < tolerance:
                return high
        if high - low < 1e-9:
            return high


def client_noise_stdv(noise_multiplier: float, clip: float, sampled_clients: int) -> float:
    """Standard deviation of the noise the wrappers add to each coordinate of the
    averaged model (Flower's ``compute_stdv``)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(noise_multiplier, clip, sampled_clients)
