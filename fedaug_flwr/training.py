"""The one training loop and the one evaluation loop, used by clients and the server.

Data stays in memory as tensors; minibatches are slices of a seeded
permutation, which avoids a DataLoader's per-item Python overhead. A penalty on
the weights (FedProx's proximal term, :func:`proximal_penalty`) is an argument of
the same loop. Nothing here knows about Flower.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedaug_flwr.data import Digits
from fedaug_flwr.metrics import classification_metrics

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Penalty = Callable[[nn.Module], torch.Tensor]


class NonFiniteLoss(ArithmeticError):
    """Local training produced a NaN or infinite loss."""


@dataclass(frozen=True)
class TensorData:
    """Images (N, 1, 28, 28) float32 in [0, 1] (0/1 when binarized) and int64 labels, on
    one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_digits(cls, *parts: Digits, device: str | torch.device = "cpu") -> TensorData:
        """``parts`` concatenated, each byte divided by its kind's scale (1 for 0/1 images,
        255 for grey levels); binary and grey-level parts together are refused, as the
        classifier would learn two kinds of pixels (e.g. 0/1 real beside grey synthetic)."""
        kinds = {part.grey for part in parts}
        if len(kinds) > 1:
            raise ValueError(
                "cannot put binary (0/1) and grey-level (0..255) images in one training set: "
                f"parts are {['grey' if part.grey else 'binary' for part in parts]}"
            )
        images = np.concatenate([part.images for part in parts])
        labels = np.concatenate([part.labels for part in parts])
        pixels = torch.from_numpy(images).to(device=device, dtype=torch.float32).unsqueeze(1)
        scale = parts[0].scale if parts else 1
        if scale != 1:
            pixels = pixels.div_(scale)
        return cls(pixels, torch.from_numpy(labels).to(device=device, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)


# How an epoch is cut into minibatches: (data, batch size, seeded generator) -> batches.
Batches = Callable[[TensorData, int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def minibatches(
    data: TensorData, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive slices; shuffled when a generator is given."""
    if generator is None:
        order = None
    else:
        order = torch.randperm(len(data), generator=generator).to(data.labels.device)
    for start in range(0, len(data), batch_size):
        if order is None:
            yield data.images[start : start + batch_size], data.labels[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield data.images[index], data.labels[index]


def train(
    model: nn.Module,
    data: TensorData,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch_end: Callable[[int, float], None] | None = None,
    penalty: Penalty | None = None,
    batches: Batches = minibatches,
) -> float:
    """Train for ``epochs`` over shuffled minibatches; returns the last epoch's mean loss.

    A loss that is not finite (NaN or infinity: diverged, or a broken model) stops the
    training with :class:`NonFiniteLoss`, naming the epoch and batch: such weights must
    never be sent anywhere.

    ``penalty(model)``, when given, is added to every minibatch's loss before the
    gradient (e.g. :func:`proximal_penalty`); the returned loss is the data loss
    alone, comparable between runs with and without a penalty.

    ``batches`` cuts each epoch into minibatches (default: consecutive slices of a
    seeded permutation); DP-SGD passes Poisson sampling (:mod:`fedaug_flwr.dp`).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    generator = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for batch, (images, labels) in enumerate(batches(data, batch_size, generator)):
            if len(labels) < 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a batch of one
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, images, labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"local training stopped: the loss became {value} in epoch {epoch + 1} of "
                    f"{epochs}, batch {batch + 1} (diverged? try a lower learning rate)"
                )
            (loss if penalty is None else loss + penalty(model)).backward()
            optimizer.step()
            total += value * len(labels)
            seen += len(labels)
        mean_loss = total / max(seen, 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean_loss)
    return mean_loss


def proximal_penalty(anchor: Mapping[str, torch.Tensor], mu: float) -> Penalty:
    """FedProx's proximal term (Li et al. 2020): ``(mu / 2) * ||w - anchor||^2`` over the
    model's trainable parameters, ``anchor`` holding (frozen) the weights the client
    received. Its gradient adds ``mu * (w - anchor)`` to the loss's; buffers (BatchNorm's
    running statistics) are not weights and have none."""
    frozen = {name: tensor.detach() for name, tensor in anchor.items()}

    def penalty(model: nn.Module) -> torch.Tensor:
        squares = [
            (parameter - frozen[name]).pow(2).sum()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        ]
        return (mu / 2) * torch.stack(squares).sum()

    return penalty


def frozen_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's trainable parameters: the anchor of
    :func:`proximal_penalty` when taken right after the received weights are loaded."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, batch_size: int) -> tuple[torch.Tensor, float]:
    """Class probabilities for every image and the mean cross-entropy."""
    model.eval()
    probabilities, total_loss = [], 0.0
    for images, labels in minibatches(data, batch_size):
        logits = model(images)
        total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        probabilities.append(torch.softmax(logits, dim=1))
    return torch.cat(probabilities), total_loss / max(len(data), 1)


def evaluate_classifier(model: nn.Module, data: TensorData, batch_size: int) -> dict[str, float]:
    """Loss, accuracy, micro- and macro-F1 of a classifier on ``data`` (see
    :func:`~fedaug_flwr.metrics.classification_metrics`)."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    probabilities, mean_loss = predict(model, data, batch_size)
    predictions = probabilities.argmax(dim=1).cpu().numpy()
    return classification_metrics(data.labels.cpu().numpy(), predictions, mean_loss)


def with_recalibrated_batchnorm(model: nn.Module, data: TensorData, batch_size: int) -> nn.Module:
    """A copy of ``model`` (same weights) whose BatchNorm running statistics are measured
    anew on ``data``, in eval mode. FedAvg averages each client's running statistics, which
    were measured under that client's own weights, not under the averaged ones; this copy
    shows what the averaged weights are worth with statistics that match them.

    PyTorch's ``update_bn`` (built for SWA's averaged weights, the same mismatch) does the
    measuring: it resets the statistics and averages them over the minibatches, each batch
    weighing the same."""
    recalibrated = copy.deepcopy(model)
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(minibatches(data, batch_size), recalibrated)
    return recalibrated.eval()


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: TensorData, loss_fn: LossFn, batch_size: int) -> float:
    """Mean of a per-batch loss (e.g. the CVAE's) over ``data``."""
    model.eval()
    total = 0.0
    for images, labels in minibatches(data, batch_size):
        total += float(loss_fn(model, images, labels)) * len(labels)
    return total / max(len(data), 1)


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from several integers (run seed, round, partition...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def seeded(seed: int, phase: int, build: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """Initial weights that depend on the run seed only (torch's global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(seed, phase))
        return build().state_dict()


def rng_state() -> dict:
    """The process's global random generators (``random``, NumPy's, torch's CPU one) as
    plain data (lists and numbers), for a checkpoint; :func:`set_rng_state` puts it back."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "random": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    """The generators as :func:`rng_state` found them."""
    version, mt, gauss = state["random"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
