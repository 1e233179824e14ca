"""The one training loop and the one evaluation loop, used by clients and the server.

Data stays in memory as tensors; minibatches are slices of a seeded
permutation, which avoids a DataLoader's per-item Python overhead. Nothing
here knows about Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedaug_flwr.data import Digits
from fedaug_flwr.metrics import classification_metrics

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorData:
    """Images (N, 1, 28, 28) float32 in {0, 1} and int64 labels, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_digits(cls, *parts: Digits, device: str | torch.device = "cpu") -> TensorData:
        images = np.concatenate([part.images for part in parts])
        labels = np.concatenate([part.labels for part in parts])
        return cls(
            torch.from_numpy(images).to(device=device, dtype=torch.float32).unsqueeze(1),
            torch.from_numpy(labels).to(device=device, dtype=torch.long),
        )

    def __len__(self) -> int:
        return len(self.labels)


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
) -> float:
    """Train for ``epochs`` over shuffled minibatches; returns the last epoch's mean loss."""
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    generator = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for images, labels in minibatches(data, batch_size, generator):
            if len(labels) < 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a batch of one
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, images, labels)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
        mean_loss = total / max(seen, 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean_loss)
    return mean_loss


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
