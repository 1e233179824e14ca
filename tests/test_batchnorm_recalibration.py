"""The ``bn-recalibration-images`` diagnostic: each global classifier scored again on the
global test set with BatchNorm statistics measured anew, the model itself unchanged.

The real pipeline and the real ClientApp run in this process (``LocalGrid``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import client_app
from fedaug_flwr import pipeline
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.data import load_source, resolve_source
from fedaug_flwr.experiments.aggregate import final_row, round_rows
from fedaug_flwr.models import load_classifier
from fedaug_flwr.results import SUMMARY, load_state_dict
from fedaug_flwr.training import TensorData, evaluate_classifier, with_recalibrated_batchnorm
from tests.data_files import real_digits, write_npz
from tests.local_grid import SMALL_RUN, LocalGrid

CALIBRATION_IMAGES = 60


def test_recalibration_measures_the_statistics_on_the_data_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(2, 1, 28, 28))  # the lazy layer takes its shape
    batchnorm = model[1]
    batchnorm.running_mean.fill_(5.0)  # statistics that belong to some other model
    batchnorm.running_var.fill_(9.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorData(torch.rand(40, 1, 28, 28), torch.zeros(40, dtype=torch.int64))

    recalibrated = with_recalibrated_batchnorm(model, data, batch_size=10)

    with torch.no_grad():
        activations = model[0](data.images)  # what the BatchNorm layer sees
    # four equal batches: the mean of their means is the mean over all 40 images
    torch.testing.assert_close(recalibrated[1].running_mean, activations.mean(dim=(0, 2, 3)))
    batch_variances = torch.stack(
        [activations[i : i + 10].var(dim=(0, 2, 3)) for i in range(0, 40, 10)]
    )
    torch.testing.assert_close(recalibrated[1].running_var, batch_variances.mean(dim=0))
    assert not recalibrated.training
    for name, parameter in recalibrated.named_parameters():
        torch.testing.assert_close(parameter, before[name])
    for name, value in model.state_dict().items():  # the model given is untouched
        torch.testing.assert_close(value, before[name])


def test_a_negative_count_is_refused_by_name():
    with pytest.raises(ConfigError, match="bn-recalibration-images"):
        AppConfig.from_run_config({"bn-recalibration-images": -1})


@pytest.mark.usefixtures("in_process_run")
def test_every_round_records_the_recalibrated_score_of_the_global_model(tmp_path):
    folder = tmp_path / "node-data"
    folder.mkdir()
    nodes = [
        {"partition-id": i, "data-path": str(write_npz(folder / f"{i}.npz", *real_digits(90, i)))}
        for i in range(2)
    ]
    settings = {
        **SMALL_RUN,
        "imputation": "none",
        "num-synthetic": 0,
        "clf-rounds": 2,
        "bn-recalibration-images": CALIBRATION_IMAGES,
        "output-dir": str(tmp_path / "run"),
    }
    config = AppConfig.from_run_config(settings)
    output_dir = pipeline.run(LocalGrid(client_app.app, nodes), config, run_id=1)
    summary = json.loads((output_dir / SUMMARY).read_text())

    classifier = summary["classifier"]
    assert classifier["bn-recalibration"]["images"] == CALIBRATION_IMAGES
    assert set(classifier["initial-global-test-recalibrated"]) == set(
        classifier["initial-global-test"]
    )
    for entry in classifier["rounds"]:
        own, recalibrated = entry["global-test"], entry["global-test-recalibrated"]
        assert set(own) == set(recalibrated)
        assert 0.0 <= recalibrated["accuracy"] <= 1.0
        assert recalibrated["loss"] != own["loss"]  # other statistics, other outputs
    # the summary names the machine: a seed fixes the numbers only on the same kind of CPU
    assert summary["machine"]["cores"] == os.cpu_count()
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["cpu"]
    final = summary["final"]
    assert final["global-test-recalibrated"] == classifier["rounds"][-1]["global-test-recalibrated"]

    # the same numbers again from the saved final model and the run's own sample
    data = load_source(*resolve_source(config.dataset, config.data_dir)[:2], config.binarized)
    model = load_classifier(load_state_dict(output_dir / "classifier.pt"))
    sample = pipeline.batchnorm_calibration(data, config)
    assert len(sample) == CALIBRATION_IMAGES
    again = evaluate_classifier(
        with_recalibrated_batchnorm(model, sample, config.eval_batch_size),
        TensorData.from_digits(data.test),
        config.eval_batch_size,
    )
    assert again == pytest.approx(final["global-test-recalibrated"], rel=1e-6)
    # and the tables carry them
    assert final_row(summary)["global-test-recalibrated-accuracy"] == again["accuracy"]
    assert [r["global-test-recalibrated-accuracy"] for r in round_rows(summary)] == [
        e["global-test-recalibrated"]["accuracy"] for e in classifier["rounds"]
    ]
