"""Grey-level data through the app: synthetic images are the decoder's pixel means in
[0, 1] (never binarized), the CVAE trains on grey targets, features and pictures take
them, and a tiny run goes through the real pipeline and ClientApp in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import client_app
from fedaug_flwr import node, pipeline
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import Digits
from fedaug_flwr.fidelity import pooled_features
from fedaug_flwr.imputation import generate
from fedaug_flwr.models import CVAE, ExquisiteNetV1, cvae_loss
from fedaug_flwr.partition import ClientSplit
from fedaug_flwr.plots import save_sample_grid
from fedaug_flwr.pretrain import synthetic_digits
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.results import SUMMARY
from fedaug_flwr.training import TensorData
from fedaug_flwr.transport import to_state_dict
from tests.local_grid import SMALL_RUN, LocalGrid
from tests.test_fashion_mnist import write_fashion_folder


class GradientDecoder(CVAE):
    """Decodes every code to one image: pixel i has probability i / 783 (0 to 1)."""

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image = torch.arange(784, dtype=torch.float32).view(1, 1, 28, 28) / 783.0
        return image.expand(len(z), 1, 28, 28)


def test_grey_level_generation_keeps_the_pixel_means_in_0_1():
    labels = np.array([3, 5, 7])
    images = generate(GradientDecoder(), labels, seed=0, binarize="off")
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    means = np.arange(784) / 783.0
    assert images[0].reshape(-1).tolist() == np.rint(means * 255).astype(int).tolist()
    assert len(np.unique(images)) == 256  # grey levels, not 0/1
    pixels = TensorData.from_digits(Digits(images, labels, grey=True)).images
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert np.abs(pixels[0, 0].numpy().reshape(-1) - means).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ValueError, match="unknown binarization 'grey'"):
        generate(GradientDecoder(), labels, seed=0, binarize="grey")


def test_synthetic_sets_and_a_clients_imputation_are_grey_for_grey_data():
    torch.manual_seed(0)
    cvae = CVAE()
    pretraining = synthetic_digits(cvae, 40, seed=1, batch_size=16, binarize="off")
    assert pretraining.grey and len(np.unique(pretraining.images)) > 2
    assert not synthetic_digits(cvae, 40, seed=1, batch_size=16).grey

    config = AppConfig.from_run_config(
        {"dataset": "fashion-mnist", "imputation": "uniform", "num-synthetic": 30}
    )
    task = TaskConfig(config, "fashion-mnist", "")
    rng = np.random.default_rng(0)
    real = Digits(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 4, True)
    split = ClientSplit(0, real.subset(np.arange(30)), real.subset([30]), real.subset([31]))
    report = node.impute(task, split, cvae.state_dict())
    synthetic = report.synthetic
    assert synthetic.grey and len(synthetic) == 30 and len(np.unique(synthetic.images)) > 2
    # real and synthetic train together, all in [0, 1]
    pixels = TensorData.from_digits(split.train, synthetic).images
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    # what a client keeps in context.state (two arrays) comes back as the same images
    kept = node.synthetic_images(task, synthetic.images.copy(), synthetic.labels.copy())
    assert kept.grey and np.array_equal(kept.images, synthetic.images)


def test_the_cvae_learns_grey_levels_with_bce_on_0_1_targets():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 28, 28), dtype=np.uint8)
    data = TensorData.from_digits(Digits(images, np.arange(32) % 10, grey=True))
    model = CVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = cvae_loss(model, data.images, data.labels, recon="bce")
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert torch.isfinite(cvae_loss(model, data.images, data.labels, recon="sse"))


def test_features_and_pictures_take_grey_images(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    model = ExquisiteNetV1()
    features = pooled_features(model, Digits(images, np.arange(6), grey=True), batch_size=4)
    with torch.no_grad():
        model.eval()
        direct = model.pooled_features(torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert np.allclose(features, direct.double().numpy(), atol=1e-5)
    grid = np.repeat(images[:1], 10, axis=0)
    assert save_sample_grid(grid, 1, tmp_path / "grey.png").stat().st_size > 0


# ------------------------------------------------------------------ the real pipeline


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_folder(folder / "FashionMNIST" / "raw", n_train=300, n_test=40, seed=3)
    return folder


def grey_run(folder, tmp_path, **overrides) -> tuple[dict, LocalGrid]:
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = LocalGrid(client_app.app, nodes)
    config = AppConfig.from_run_config(
        {
            **SMALL_RUN,
            "dataset": "fashion-mnist",
            "data-dir": str(folder),
            "dirichlet-beta": 100.0,
            "quality-samples": 0,
            "output-dir": str(tmp_path / "out"),
            **overrides,
        }
    )
    output_dir = pipeline.run(grid, config, run_id=1)
    return json.loads((output_dir / SUMMARY).read_text()), grid


@pytest.mark.usefixtures("in_process_run")
def test_a_tiny_grey_level_run_with_imputation_through_the_real_pipeline(fashion_folder, tmp_path):
    """Fashion-MNIST, grey: CVAE, grey synthetic images made anew each round (from the
    generator each client keeps), a classifier on real + synthetic grey images, with FedProx."""
    summary, grid = grey_run(
        fashion_folder,
        tmp_path,
        **{"synthetic-refresh": "every-round", "clf-strategy": "fedprox", "proximal-mu": 0.01},
    )
    assert summary["data"]["source"] == "fashion-mnist"
    assert summary["data"]["fallback-reason"] == ""
    assert summary["config"]["binarize"] == "auto"
    assert summary["config"]["synthetic-binarize"] == "off"
    assert summary["config"]["proximal-mu"] == 0.01
    clients = summary["clients"]
    assert len(clients) == 3 and all(c["synthetic-train"] >= 10 for c in clients)
    assert all(not r["failures"] for r in summary["classifier"]["rounds"])
    # the synthetic images a client trains on are grey levels
    task = TaskConfig(
        AppConfig.from_run_config(summary["config"]), "fashion-mnist", str(fashion_folder)
    )
    generator = to_state_dict(grid.contexts[min(grid.contexts)].state["generator"])
    split = node.load_split(task, grid.contexts[min(grid.contexts)].node_config)
    synthetic = node.impute(task, split, generator, server_round=1).synthetic
    assert synthetic.grey and len(np.unique(synthetic.images)) > 2


@pytest.mark.usefixtures("in_process_run")
def test_grey_images_imputed_once_are_kept_between_messages(fashion_folder, tmp_path):
    summary, _ = grey_run(fashion_folder, tmp_path, **{"synthetic-refresh": "once"})
    assert all(not r["failures"] for r in summary["classifier"]["rounds"])


@pytest.mark.usefixtures("in_process_run")
def test_the_quality_check_measures_grey_synthetic_images(fashion_folder, tmp_path):
    summary, _ = grey_run(
        fashion_folder,
        tmp_path,
        **{"synthetic-refresh": "every-round", "quality-samples": 70, "quality-epochs": 1},
    )
    assert summary["generator-quality"]["fidelity"]["frechet-distance"] >= 0


@pytest.mark.usefixtures("in_process_run")
def test_the_server_binarizes_as_the_clients_do(fashion_folder, tmp_path, monkeypatch):
    from fedaug_flwr import data

    calls = []
    original = data._load_source

    def spy(source, folder, binarized):
        calls.append(binarized)
        return original(source, folder, binarized)

    monkeypatch.setattr(data, "_load_source", spy)
    grey_run(fashion_folder, tmp_path, **{"imputation": "none", "binarize": "on"})
    assert calls and all(calls)  # server and clients alike: binarized clothing
