"""Finetune variant (server-side synthetic pretraining) and generator quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client_app import app as client_app
from fedaug_flwr.data import MNIST_TRAIN_LABEL_COUNTS
from fedaug_flwr.models import CVAE
from fedaug_flwr.pretrain import proportional_counts, synthetic_digits, synthetic_mnist
from fedaug_flwr.results import load_state_dict
from server_app import build_server_app
from tests.conftest import TINY
from tests.test_simulation import run_in_process


def test_proportional_counts_are_exact_and_follow_mnist():
    counts = proportional_counts(70000)
    assert sum(counts) == 70000
    expected = np.array(MNIST_TRAIN_LABEL_COUNTS) / 60000 * 70000
    assert np.abs(np.array(counts) - expected).max() < 1
    assert sum(proportional_counts(37)) == 37


def test_generated_labels_match_the_requested_proportions():
    digits = synthetic_digits(CVAE(), 700, seed=0, batch_size=256)
    assert digits.label_counts() == proportional_counts(700)
    assert set(np.unique(digits.images)) <= {0, 1}
    split = synthetic_mnist(CVAE(), 700, seed=0, batch_size=256)
    assert (len(split.train), len(split.test)) == (600, 100)  # MNIST's 6:1


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    from flwr.simulation import run_simulation

    output = tmp_path_factory.mktemp("finetune") / "run"
    overrides = {**TINY, "pretrain": "federated", "num-synthetic": 20, "output-dir": str(output)}
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=client_app,
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
    return output, json.loads((output / "summary.json").read_text())


@pytest.mark.simulation
def test_pretrained_and_finetuned_sections_are_recorded(pretrained_run):
    output, summary = pretrained_run
    pretraining = summary["pretraining"]
    assert pretraining["samples"] == {"train": 120, "test": 20}
    assert len(pretraining["epochs"]) == TINY["pretrain-epochs"]
    for row in pretraining["epochs"]:
        assert {"train-loss", "synthetic-test", "real-test"} <= set(row)
        assert {"loss", "accuracy", "macro-f1"} <= set(row["real-test"])
    assert len(pretraining["pretrained"]["per-client"]) == 3
    assert {"macro-f1", "macro-f1-weighted"} <= set(pretraining["pretrained"]["clients"])
    assert summary["final"]["model"] == "finetuned"
    assert summary["classifier"]["local-epochs"] == TINY["finetune-local-epochs"]
    assert (output / "pretrained.pt").is_file() and (output / "classifier.pt").is_file()


@pytest.mark.simulation
def test_classifier_phase_starts_from_the_pretrained_weights(pretrained_run):
    output, summary = pretrained_run
    classifier, pretraining = summary["classifier"], summary["pretraining"]
    assert classifier["initial-weights-sha256"] == pretraining["weights-sha256"]
    # behaviour, not bookkeeping: the round-0 global evaluation is the pretrained model's
    assert classifier["initial-global-test"] == pytest.approx(
        pretraining["pretrained"]["global-test"]
    )
    weights = load_state_dict(output / "pretrained.pt")
    from fedaug_flwr.models import weights_digest

    assert weights_digest(weights) == pretraining["weights-sha256"]


@pytest.mark.simulation
def test_generator_quality_is_measured_on_real_and_synthetic(pretrained_run):
    output, summary = pretrained_run
    quality = summary["pretraining"]["quality"]  # the pretrained model's own scores
    assert "pretrained" in quality["classifier"]
    for split, size in (("real-test", summary["data"]["global-test-size"]), ("synthetic-test", 20)):
        scores = quality[split]
        assert len(scores["per-class-accuracy"]) == len(scores["per-class-f1"]) == 10
        assert sum(scores["histogram-max-probability"]) == size
    assert (output / "pretrained_probability_histograms.png").stat().st_size > 0
    # the quick check with its real-image reference runs with pretraining too
    assert {"reference", "gap", "fidelity"} <= set(summary["generator-quality"])
    assert (output / "probability_histograms.png").stat().st_size > 0


@pytest.mark.usefixtures("in_process_run")
def test_local_finetuning_leaves_no_aggregated_model(tmp_path):
    summary = run_in_process(tmp_path, "local", seed=1, pretrain="local")
    assert "classifier" not in summary["artifacts"]
    assert not (tmp_path / "local" / "classifier.pt").exists()
    assert summary["classifier"] == {"skipped": "local fine-tuning: no aggregated model"}
    assert summary["final"]["model"] == "finetuned-locally"
    assert summary["final"]["global-test"] is None
    assert all("final-test" in client for client in summary["clients"])
    assert "pretrained" in summary["pretraining"]
