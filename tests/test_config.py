"""Run-config validation: defaults come from pyproject, every bad value names its key."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from fedaug_flwr.config import PYPROJECT, AppConfig, ConfigError


def test_defaults_are_the_pyproject_values():
    with PYPROJECT.open("rb") as handle:
        declared = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    config = AppConfig.from_run_config({})
    # pyproject declares every key, each with the type the app uses: a float written
    # without a dot (`cvae-lr = 1`) would reach `flwr run` as an int
    fields = {f.name.replace("_", "-"): f.type for f in dataclasses.fields(AppConfig)}
    assert {key: type(value).__name__ for key, value in declared.items()} == fields
    # the study's hyper-parameters
    assert (config.cvae_rounds, config.clf_rounds, config.cvae_latent_dim) == (15, 15, 3)
    assert (config.clf_lr, config.clf_weight_decay, config.clf_batch_size) == (0.01, 1e-4, 32)


def test_int_given_for_float_key_is_accepted():
    # `--run-config cvae-lr=1` arrives from TOML as the int 1
    assert AppConfig.from_run_config({"cvae-lr": 1}).cvae_lr == 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-synthetic", -1),
        ("num-synthetic", 1.5),
        ("dirichlet-beta", 0.0),
        ("dirichlet-beta", -0.3),
        ("dirichlet-beta", float("nan")),
        ("imputation", "majority"),
        ("dataset", "cifar10"),
        ("cvae-recon-loss", "l1"),
        ("cvae-rounds", 0),
        ("clf-rounds", True),
        ("clf-lr", "0.01"),
        ("seed", -5),
        ("fraction-train", 0.0),
        ("fraction-evaluate", 1.5),
        ("evaluate-on-receipt", "false"),
        ("evaluate-on-receipt", 0),
        ("val-fraction", 1.0),
        ("min-clients", 0),
        ("min-partition-size", 2),
        ("output-dir", 3),
    ],
)
def test_bad_value_is_rejected_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        AppConfig.from_run_config({key: value})


def test_unknown_key_is_rejected_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown run-config key.*'num-synthtic'"):
        AppConfig.from_run_config({"num-synthtic": 10})


def test_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="val-fraction \\+ test-fraction"):
        AppConfig.from_run_config({"val-fraction": 0.5, "test-fraction": 0.45})


def test_no_imputation_means_no_synthetic_images():
    assert AppConfig.from_run_config({"imputation": "none"}).synthetic_per_client == 0
    assert AppConfig.from_run_config({"num-synthetic": 7}).synthetic_per_client == 7
