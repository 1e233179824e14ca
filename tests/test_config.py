"""Run-config validation: defaults come from pyproject, every bad value names its key."""

from __future__ import annotations

import tomllib

import pytest

from fedaug_flwr.config import PYPROJECT, AppConfig, ConfigError


def test_defaults_are_the_pyproject_values():
    with PYPROJECT.open("rb") as handle:
        declared = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    config = AppConfig.from_run_config({})
    assert config.to_run_config() == declared
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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("privacy-audit", "yes"),
        ("cvae-dp", "user"),
        ("cvae-dp-noise", -0.5),
        ("cvae-dp-clip", 0.0),
        ("cvae-dp-delta", 0.0),
        ("cvae-dp-delta", 1.0),
        ("cvae-dp-epsilon", -1.0),
        ("cvae-dp-epsilon", float("inf")),
    ],
)
def test_bad_privacy_value_is_rejected_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        AppConfig.from_run_config({key: value})


def test_privacy_keys_default_to_no_dp_and_an_audit():
    config = AppConfig.from_run_config({})
    assert (config.cvae_dp, config.privacy_audit, config.cvae_dp_epsilon) == ("off", True, 0.0)
    sample = AppConfig.from_run_config({"cvae-dp": "sample", "cvae-dp-epsilon": 4})
    assert (sample.cvae_dp_noise, sample.cvae_dp_epsilon) == (1.0, 4.0)


def test_dp_needs_a_noise_or_a_budget():
    with pytest.raises(ConfigError, match="cvae-dp='client' needs a noise multiplier"):
        AppConfig.from_run_config({"cvae-dp": "client", "cvae-dp-noise": 0.0})
    derived = AppConfig.from_run_config(
        {"cvae-dp": "client", "cvae-dp-noise": 0.0, "cvae-dp-epsilon": 8.0}
    )
    assert derived.cvae_dp_noise == 0.0
    AppConfig.from_run_config({"cvae-dp-noise": 0.0})  # off: nothing to check
