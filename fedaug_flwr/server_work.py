"""What the server computes itself from the global CVAE; no client takes part.

- :func:`save_cvae_samples`: a grid of the CVAE's samples, a row per label;
- :func:`pretrain_on_server` (finetune variant): an MNIST-sized synthetic set and
  ExquisiteNet trained on it, the starting point of the classifier phase;
- :func:`check_generator_quality`: train on synthetic, test on real, beside a
  reference trained on real images, and the Fréchet distance and coverage.

Each returns its section of ``summary.json`` and the files it wrote into the
results folder (``artifacts``), by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedaug_flwr import log
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import NUM_CLASSES, Digits, MnistData
from fedaug_flwr.fidelity import feature_fidelity
from fedaug_flwr.imputation import generate
from fedaug_flwr.models import ExquisiteNetV1, load_cvae, weights_digest
from fedaug_flwr.plots import save_probability_histograms, save_sample_grid
from fedaug_flwr.pretrain import evaluation_curve, synthetic_mnist, train_on_synthetic
from fedaug_flwr.quality import (
    REFERENCE_NOTE,
    fidelity_sample,
    gap,
    generator_quality,
    label_matched_sample,
    reference_scores,
)
from fedaug_flwr.results import save_state_dict
from fedaug_flwr.training import TensorData, seed_for

SAMPLES_PER_LABEL = 10
CVAE_SAMPLES = "cvae_samples.png"


@dataclass
class ServerWork:
    """A section of the summary, the files written for it, and the model it made, if any."""

    section: dict
    files: dict[str, Path] = field(default_factory=dict)
    weights: dict | None = None


def save_cvae_samples(weights: dict, config: AppConfig, output_dir: Path) -> Path:
    """Ten samples per label from the global CVAE, as ``cvae_samples.png``."""
    cvae = load_cvae(weights, config.cvae_latent_dim)
    labels = np.repeat(np.arange(NUM_CLASSES), SAMPLES_PER_LABEL)
    images = generate(
        cvae,
        labels,
        seed=config.seed,
        batch_size=config.generation_batch_size,
        binarize=config.synthetic_binarize,
    )
    return save_sample_grid(images, SAMPLES_PER_LABEL, output_dir / CVAE_SAMPLES)


def pretrain_on_server(
    cvae_weights: dict, config: AppConfig, global_test: TensorData, output_dir: Path
) -> ServerWork:
    """Finetune variant: generate an MNIST-sized synthetic set and train ExquisiteNet on it.

    The section lacks ``pretrained`` (the model's scores on the clients), which only
    the clients can add.
    """
    synthetic = synthetic_mnist(
        load_cvae(cvae_weights, config.cvae_latent_dim),
        config.pretrain_samples,
        config.seed,
        config.generation_batch_size,
        config.synthetic_binarize,
    )
    synthetic_test = TensorData.from_digits(synthetic.test)
    curve, record_epoch = evaluation_curve(
        global_test, synthetic_test, config.pretrain_epochs, config.eval_batch_size
    )
    model = train_on_synthetic(
        synthetic.train,
        config.pretrain_epochs,
        config.pretrain_lr,
        config.pretrain_weight_decay,
        config.pretrain_batch_size,
        config.seed,
        on_epoch=record_epoch,
    )
    weights = model.state_dict()
    files = {"pretrained": save_state_dict(output_dir / "pretrained.pt", weights)}
    section = {
        "mode": config.pretrain,
        "samples": {"train": len(synthetic.train), "test": len(synthetic.test)},
        "label-counts-train": synthetic.train.label_counts(),
        "epochs": curve,
        "weights-sha256": weights_digest(weights),
    }
    description = (
        f"the pretrained ExquisiteNetV1 ({len(synthetic.train)} synthetic images, "
        f"{config.pretrain_epochs} epochs)"
    )
    quality = generator_quality(
        model, global_test, synthetic_test, config.eval_batch_size, description
    )
    files["pretrained-probability-histograms"] = save_probability_histograms(
        quality, output_dir / "pretrained_probability_histograms.png"
    )
    section["quality"] = quality
    real, synthetic_scores = quality["real-test"], quality["synthetic-test"]
    log.info(
        "[fedaug] pretrained model: real-test accuracy %.3f, macro-F1 %.3f "
        "(synthetic-test accuracy %.3f)",
        real["accuracy"],
        real["macro-f1"],
        synthetic_scores["accuracy"],
    )
    return ServerWork(section, files, weights)


def check_generator_quality(
    cvae_weights: dict, config: AppConfig, data: MnistData, output_dir: Path
) -> ServerWork:
    """Train-on-synthetic / test-on-real with a small fixed classifier, beside a reference
    trained the same way on as many real pool images, and the Fréchet distance and coverage
    of synthetic against real test images in the reference's features (``quality``,
    ``fidelity``). The reference uses real training images on the server, which a real
    deployment would not have: a measurement aid, said so in the summary's ``note``."""
    cvae = load_cvae(cvae_weights, config.cvae_latent_dim)
    synthetic = synthetic_mnist(
        cvae,
        config.quality_samples,
        config.seed,
        config.generation_batch_size,
        config.synthetic_binarize,
    )
    rng = np.random.default_rng(seed_for(config.seed, 14))
    real_train, repeats = label_matched_sample(data.pool, synthetic.train.label_counts(), rng)

    def fit(train_set: Digits) -> ExquisiteNetV1:
        # one budget for both: as many images, the same epochs, optimizer settings and seed
        return train_on_synthetic(
            train_set,
            config.quality_epochs,
            config.clf_lr,
            config.clf_weight_decay,
            config.clf_batch_size,
            config.seed,
        )

    model, reference = fit(synthetic.train), fit(real_train)
    images, epochs = len(synthetic.train), config.quality_epochs
    real_test = TensorData.from_digits(data.test)
    synthetic_test = TensorData.from_digits(synthetic.test)
    quality = generator_quality(
        model,
        real_test,
        synthetic_test,
        config.eval_batch_size,
        f"ExquisiteNetV1 trained on {images} synthetic images for {epochs} epochs "
        "(quality-samples, quality-epochs)",
    )
    files = {
        "probability-histograms": save_probability_histograms(
            quality, output_dir / "probability_histograms.png"
        )
    }
    quality["note"] = REFERENCE_NOTE
    quality["reference"] = reference_scores(
        reference,
        real_test,
        synthetic_test,
        config.eval_batch_size,
        f"the same ExquisiteNetV1 trained on {images} real pool images for {epochs} epochs",
        real_train,
        repeats,
    )
    quality["gap"] = gap(quality, quality["reference"])
    real = fidelity_sample(data.test, rng)
    generated = generate(
        cvae,
        real.labels,
        seed_for(config.seed, 15),
        config.generation_batch_size,
        binarize=config.synthetic_binarize,
    )
    quality["fidelity"] = feature_fidelity(
        reference,
        real,
        Digits(generated, real.labels, grey=not config.binarized),
        config.eval_batch_size,
    )
    _log_quality(quality)
    return ServerWork(quality, files)


def _log_quality(quality: dict) -> None:
    fidelity, coverage = quality["fidelity"], quality["fidelity"]["coverage"]
    log.info(
        "[fedaug] generator quality: real-test accuracy %.3f trained on synthetic vs %.3f on "
        "real (gap %.3f, macro-F1 gap %.3f); Frechet distance %.2f, coverage %.3f",
        quality["real-test"]["accuracy"],
        quality["reference"]["real-test"]["accuracy"],
        quality["gap"]["accuracy"],
        quality["gap"]["macro-f1"],
        fidelity["frechet-distance"],
        float("nan") if coverage is None else coverage,
    )
