"""Server-side synthetic data: MNIST-like sets from the global CVAE, and classifiers
trained on them alone (the finetune variant's pretraining, and the quality check).

Only the server runs this; it needs the global CVAE and the public MNIST test
set, never a client's data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedaug_flwr import log
from fedaug_flwr.data import MNIST_TRAIN_LABEL_COUNTS, NUM_CLASSES, Digits
from fedaug_flwr.imputation import generate
from fedaug_flwr.models import CVAE, ExquisiteNetV1, classifier_loss
from fedaug_flwr.training import TensorData, evaluate_classifier, seed_for, train


def proportional_counts(
    total: int, weights: tuple[int, ...] = MNIST_TRAIN_LABEL_COUNTS
) -> list[int]:
    """Split ``total`` over labels in proportion to ``weights`` (largest remainders), exactly."""
    shares = np.asarray(weights, dtype=float) / sum(weights) * total
    counts = np.floor(shares).astype(int)
    for label in np.argsort(-(shares - counts), kind="stable")[: total - counts.sum()]:
        counts[label] += 1
    return [int(c) for c in counts]


def synthetic_digits(
    cvae: CVAE,
    total: int,
    seed: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    binarize: str = "round",
) -> Digits:
    """``total`` images with MNIST's label proportions, generated in batches: binarized,
    or grey levels with ``binarize="off"`` (see :func:`~fedaug_flwr.imputation.generate`)."""
    labels = np.repeat(np.arange(NUM_CLASSES), proportional_counts(total))
    labels = np.random.default_rng(seed).permutation(labels)
    images = generate(cvae, labels, seed, batch_size, device, binarize)
    return Digits(images, labels, grey=binarize == "off")


@dataclass(frozen=True)
class SyntheticSplit:
    train: Digits
    test: Digits


def synthetic_mnist(
    cvae: CVAE, total: int, seed: int, batch_size: int, binarize: str = "round"
) -> SyntheticSplit:
    """An MNIST-shaped synthetic set: 6/7 train, 1/7 test (60k / 10k for 70k), both
    with MNIST's label proportions."""
    test_total = max(NUM_CLASSES, round(total / 7))
    train_seed, test_seed = seed_for(seed, 10), seed_for(seed, 11)
    return SyntheticSplit(
        train=synthetic_digits(cvae, total - test_total, train_seed, batch_size, "cpu", binarize),
        test=synthetic_digits(cvae, test_total, test_seed, batch_size, "cpu", binarize),
    )


def train_on_synthetic(
    train_set: Digits,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[int, ExquisiteNetV1, float], None] | None = None,
) -> ExquisiteNetV1:
    """ExquisiteNet trained centrally on ``train_set`` (on the GPU if there is one): a
    function of ``seed`` and the images alone. The initial weights and the dropout masks
    both come from torch's global generator, seeded here and restored afterwards, so
    what ran before in the process (sampling a CVAE, another classifier) changes
    nothing: the generator-quality check's reference is the same for a seed whichever
    CVAE it is compared with."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = TensorData.from_digits(train_set, device=device)
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(seed, 12))
        model = ExquisiteNetV1().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        for epoch in range(epochs):
            loss = train(
                model, data, classifier_loss, optimizer, 1, batch_size, seed_for(seed, 13, epoch)
            )
            if on_epoch is not None:
                on_epoch(epoch + 1, model, loss)
    return model.cpu()


def evaluation_curve(
    real_test: TensorData, synthetic_test: TensorData, epochs: int, batch_size: int
) -> tuple[list[dict], Callable[[int, ExquisiteNetV1, float], None]]:
    """A list that fills with one row per epoch, and the callback that fills it."""
    rows: list[dict] = []

    def record(epoch: int, model: ExquisiteNetV1, train_loss: float) -> None:
        device = next(model.parameters()).device
        row = {
            "epoch": epoch,
            "train-loss": train_loss,
            "synthetic-test": evaluate_classifier(model, _on(synthetic_test, device), batch_size),
            "real-test": evaluate_classifier(model, _on(real_test, device), batch_size),
        }
        rows.append(row)
        log.info(
            "[fedaug] pretraining epoch %d/%d: train loss %.4f, synthetic-test acc %.3f, "
            "real-test loss %.3f acc %.3f",
            epoch,
            epochs,
            train_loss,
            row["synthetic-test"]["accuracy"],
            row["real-test"]["loss"],
            row["real-test"]["accuracy"],
        )

    return rows, record


def _on(data: TensorData, device: torch.device) -> TensorData:
    return TensorData(data.images.to(device), data.labels.to(device))
