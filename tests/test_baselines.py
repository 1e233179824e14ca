"""The comparison experiment (conf/baselines.yaml) and the data check a sweep over
``dataset`` makes before its first run: each data set's IDX folder from its own variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedaug_flwr.config import AppConfig
from fedaug_flwr.experiments.grid import SweepError, load_spec, validate
from fedaug_flwr.experiments.runner import check_data
from tests.test_fashion_mnist import offline, write_fashion_folder  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "conf" / "baselines.yaml"


def test_the_comparison_grid_is_the_issues():
    spec = load_spec(BASELINES)
    validate(spec)
    configs = [AppConfig.from_run_config(run.run_config) for run in spec.runs()]
    cells = {
        (c.dataset, c.dirichlet_beta, c.clf_strategy, c.imputation, c.synthetic_per_client)
        for c in configs
    }
    assert cells == {
        (dataset, beta, strategy, imputation, k)
        for dataset in ("mnist", "fashion-mnist")
        for beta in (0.1, 0.5)
        for strategy in ("fedavg", "fedprox", "fedavgm")
        for imputation, k in (("none", 0), ("minority", 1000))
    }
    assert spec.seeds == [0, 1, 2] and len(configs) == 24 * 3  # paired: every cell, every seed
    assert {c.proximal_mu for c in configs if c.clf_strategy == "fedprox"} == {0.01}
    fedavgm = {
        (c.clf_fedavgm_lr, c.clf_fedavgm_momentum) for c in configs if c.clf_strategy == "fedavgm"
    }
    assert fedavgm == {(0.5, 0.5)}
    assert "clf-strategy" in spec.axes  # the tables' strategy column


def test_a_sweep_finds_each_data_set_through_its_own_variable(tmp_path, monkeypatch, offline):  # noqa: F811
    spec = load_spec(BASELINES)
    runs = spec.runs()
    mnist, fashion, empty = tmp_path / "mnist", tmp_path / "fashion", tmp_path / "empty"
    write_fashion_folder(mnist)  # four IDX files: all the check looks for
    write_fashion_folder(fashion / "FashionMNIST" / "raw")  # torchvision's layout
    empty.mkdir()
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(mnist))
    monkeypatch.setenv("FEDAUG_FASHION_DATA_DIR", str(fashion))
    check_data(runs)  # both found: the sweep may start
    assert offline == []  # nothing was downloaded

    monkeypatch.setenv("FEDAUG_FASHION_DATA_DIR", str(empty))
    with pytest.raises(SweepError, match=r"dataset 'fashion-mnist': .*FEDAUG_FASHION_DATA_DIR"):
        check_data(runs)

    monkeypatch.setenv("FEDAUG_FASHION_DATA_DIR", str(fashion))
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(empty))
    # full MNIST missing: the run would quietly train on the 5,000 bundled digits
    with pytest.raises(SweepError, match=r"'mnist' would run on 'mnist-5k' .*\$FEDAUG_DATA_DIR"):
        check_data(runs)


def test_runs_that_leave_the_data_set_to_the_default_pass_the_check(tmp_path, monkeypatch):
    """No ``dataset`` or ``data-dir`` in a run's config: the app's defaults (the bundled
    digits, offline) are checked, not an empty name."""
    experiment = tmp_path / "plain.yaml"
    experiment.write_text("base: {clf-rounds: 1}\nseeds: [0, 1]\n")
    monkeypatch.delenv("FEDAUG_DATA_DIR", raising=False)
    check_data(load_spec(experiment).runs())
