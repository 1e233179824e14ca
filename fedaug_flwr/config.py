"""Typed run configuration: one object built from Flower's flat ``run_config``.

The defaults live in one place only, ``[tool.flwr.app.config]`` of the app's
``pyproject.toml``; this module reads them from there, so the notebook and the
sweeps (which start from an empty ``run_config``) see the same values as
``flwr run``. Every value is validated before any work starts, and a bad one
raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fedaug_flwr.data import binarized_by_default

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

DATASETS = ("mnist-5k", "mnist", "fashion-mnist")
# Real images: binarized or grey levels; "auto" is the data set's own choice (digits binarized
# as in the study, Fashion-MNIST's clothing not).
BINARIZE_MODES = ("auto", "on", "off")
IMPUTATIONS = ("none", "uniform", "minority")
RECON_LOSSES = ("bce", "sse")
PRETRAIN_MODES = ("off", "federated", "local")
FEDAVG_WEIGHTS = ("real", "augmented")
OPTIMIZERS = ("adam", "sgd")
# Synthetic images: binarized like the real ones ("rescale", "round"), or grey levels ("off").
BINARIZATIONS = ("rescale", "round", "off")
MINORITY_ROUNDINGS = ("nearest", "up")
REFRESH = ("once", "every-round")
AGGREGATIONS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
# The classifier phase's server strategy, each Flower's own (fedaug_flwr.strategies.STRATEGIES).
CLF_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
# Each strategy's own keys: set away from their defaults, they name the strategy that reads them.
STRATEGY_KEYS = {
    "fedprox": ("proximal-mu",),
    "fedavgm": ("clf-fedavgm-lr", "clf-fedavgm-momentum"),
    "fedadam": ("clf-fedadam-eta", "clf-fedadam-tau", "clf-fedadam-beta1", "clf-fedadam-beta2"),
}
# Differential privacy of the CVAE (docs/privacy.md): none, DP-SGD on every client (one image
# is the unit, Opacus), or DP-FedAvg (one client's data is the unit, Flower's wrapper).
CVAE_DP_MODES = ("off", "sample", "client")
# What one synthetic image costs a client: the uint8 28x28 image it keeps, the float32 copy
# training makes of it (with its int64 label), and the uint8 copy that copy is made from.
BYTES_PER_SYNTHETIC_IMAGE = 28 * 28 * (1 + 4 + 1) + 8
# num-synthetic may take at most this share of the machine's memory (the rest: the real
# images, the models, Python, torch and, in simulation, the other clients).
SYNTHETIC_MEMORY_SHARE = 0.5


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class AppConfig:
    """All knobs of one run; field ``a_b`` is run-config key ``a-b``."""

    seed: int
    dataset: str
    data_dir: str
    binarize: str
    dirichlet_beta: float
    min_partition_size: int
    partition_max_draws: int
    val_fraction: float
    test_fraction: float
    cvae_rounds: int
    cvae_local_epochs: int
    cvae_lr: float
    cvae_batch_size: int
    cvae_latent_dim: int
    cvae_kl_weight: float
    cvae_recon_loss: str
    imputation: str
    num_synthetic: int
    generation_batch_size: int
    synthetic_binarize: str
    minority_rounding: str
    synthetic_refresh: str
    client_split_refresh: str
    fedavg_weights: str
    clf_rounds: int
    clf_local_epochs: int
    clf_optimizer: str
    clf_lr: float
    clf_momentum: float
    clf_weight_decay: float
    clf_batch_size: int
    clf_compile: bool
    clf_aggregation: str
    clf_trim_fraction: float
    clf_krum_malicious: int
    proximal_mu: float
    clf_strategy: str
    clf_fedavgm_lr: float
    clf_fedavgm_momentum: float
    clf_fedadam_eta: float
    clf_fedadam_tau: float
    clf_fedadam_beta1: float
    clf_fedadam_beta2: float
    eval_batch_size: int
    bn_recalibration_images: int
    pretrain: str
    pretrain_samples: int
    pretrain_epochs: int
    pretrain_lr: float
    pretrain_weight_decay: float
    pretrain_batch_size: int
    finetune_rounds: int
    finetune_local_epochs: int
    quality_samples: int
    quality_epochs: int
    fraction_train: float
    fraction_evaluate: float
    evaluate_on_receipt: bool
    sim_message_index: bool
    min_clients: int
    round_timeout: float
    output_dir: str
    tensorboard: bool
    privacy_audit: bool
    cvae_dp: str
    cvae_dp_noise: float
    cvae_dp_clip: float
    cvae_dp_delta: float
    cvae_dp_epsilon: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Merge ``run_config`` over the pyproject defaults and validate it all."""
        values = {**default_run_config(), **dict(run_config)}
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(_KEYS)}")
        kwargs = {_KEYS[key]: _check(key, value) for key, value in values.items()}
        config = cls(**kwargs)
        config._check_relations()
        if not config.binarized and config.synthetic_binarize != "off":
            # How to binarize synthetic images means nothing when the real images are grey
            # levels: the synthetic ones are grey too, and the record says so.
            config = dataclasses.replace(config, synthetic_binarize="off")
        return config

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat, dashed form Flower uses (and ``summary.json`` records)."""
        return {
            field.name.replace("_", "-"): getattr(self, field.name)
            for field in dataclasses.fields(self)
        }

    @property
    def binarized(self) -> bool:
        """Whether the real images are binarized to 0/1 (``binarize``; "auto": the data
        set's choice, MNIST's digits yes, Fashion-MNIST's clothing no) or kept as grey
        levels. Every part of a run derives it from the run config: the server's global
        test set, each client's data and its synthetic images."""
        if self.binarize == "auto":
            return binarized_by_default(self.dataset)
        return self.binarize == "on"

    @property
    def synthetic_per_client(self) -> int:
        """How many synthetic images each client adds (0 without imputation)."""
        return 0 if self.imputation == "none" else self.num_synthetic

    @property
    def trains_cvae(self) -> bool:
        """A generator is needed for imputation or for synthetic pretraining."""
        return self.synthetic_per_client > 0 or self.pretrain != "off"

    @property
    def samples_nodes(self) -> bool:
        """Rounds draw some of the nodes (a training or evaluation fraction below 1), so
        which partitions a round trains depends on how the nodes are listed."""
        return self.fraction_train < 1.0 or 0.0 < self.fraction_evaluate < 1.0

    @property
    def classifier_local_epochs(self) -> int:
        """Local epochs per classifier round: fine-tuning uses its own count."""
        return self.finetune_local_epochs if self.pretrain != "off" else self.clf_local_epochs

    @property
    def classifier_rounds(self) -> int:
        """Classifier rounds: fine-tuning a pretrained model uses its own count."""
        return self.finetune_rounds if self.pretrain != "off" else self.clf_rounds

    def _check_relations(self) -> None:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError(
                "val-fraction + test-fraction must leave at least 10% for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        if self.binarized and self.synthetic_binarize == "off":
            raise ConfigError(
                "synthetic-binarize='off' (grey-level synthetic images) needs grey-level real "
                f"images, but binarize={self.binarize!r} with dataset={self.dataset!r} "
                "binarizes them: a classifier would see two kinds of pixels. Use "
                "synthetic-binarize 'rescale' or 'round', or binarize='off'"
            )
        if self.proximal_mu > 0 and self.pretrain == "local":
            raise ConfigError(
                f"proximal-mu={self.proximal_mu} is FedProx's pull towards the global model, "
                "but pretrain='local' fine-tunes each client's copy alone (no global model "
                "to pull towards): use proximal-mu=0.0, or pretrain 'off' or 'federated'"
            )
        self._check_strategy()
        self._check_privacy()
        _check_synthetic_memory(self.num_synthetic)

    def _check_strategy(self) -> None:
        """``clf-strategy`` and its keys agree: one strategy, set up as its keys say."""
        strategy = self.clf_strategy
        if strategy != "fedavg" and self.pretrain == "local":
            raise ConfigError(
                f"clf-strategy={strategy!r} is a server strategy, but pretrain='local' fine-tunes "
                "each client's copy alone, with no server aggregation: use clf-strategy='fedavg', "
                "or pretrain 'off' or 'federated'"
            )
        if strategy != "fedavg" and self.clf_aggregation != "fedavg":
            raise ConfigError(
                f"clf-aggregation={self.clf_aggregation!r} replaces FedAvg's mean by a robust "
                f"rule, and clf-strategy={strategy!r} is a server strategy of its own: choose "
                "one (clf-aggregation='fedavg', or clf-strategy='fedavg')"
            )
        # A strategy key away from its default is read by its strategy only: with another
        # strategy it would be silently ignored (or, proximal-mu, quietly turn FedAvg into
        # FedProx), so the run refuses it.
        defaults = default_run_config()
        values = self.to_run_config()
        for owner, keys in STRATEGY_KEYS.items():
            changed = [k for k in keys if values[k] != defaults[k]]
            if owner != strategy and changed:
                settings = ", ".join(f"{k}={values[k]}" for k in changed)
                raise ConfigError(
                    f"{settings} belong(s) to clf-strategy={owner!r}, but clf-strategy="
                    f"{strategy!r}: set clf-strategy={owner!r}, or leave {changed} at the "
                    f"default(s) {[defaults[k] for k in changed]}"
                )
        if strategy == "fedprox" and self.proximal_mu == 0:
            raise ConfigError(
                "clf-strategy='fedprox' with proximal-mu=0.0 is FedAvg (no proximal term): "
                "set proximal-mu > 0 (e.g. 0.01), or clf-strategy='fedavg'"
            )
        if strategy == "fedavgm" and self.clf_fedavgm_lr == 1.0 and self.clf_fedavgm_momentum == 0:
            raise ConfigError(
                "clf-strategy='fedavgm' with clf-fedavgm-lr=1.0 and clf-fedavgm-momentum=0.0 "
                "(Flower's defaults) is FedAvg: set clf-fedavgm-momentum > 0 (e.g. 0.9) or "
                "clf-fedavgm-lr != 1.0, or clf-strategy='fedavg'"
            )

    def _check_privacy(self) -> None:
        if self.cvae_dp == "off":
            return
        if self.cvae_dp_noise == 0 and self.cvae_dp_epsilon == 0:
            raise ConfigError(
                f"cvae-dp={self.cvae_dp!r} needs a noise multiplier (cvae-dp-noise > 0) or a "
                "budget to derive it from (cvae-dp-epsilon > 0); both are 0"
            )
        if self.cvae_dp == "client" and self.fraction_train != 1.0:
            raise ConfigError(
                f"cvae-dp='client' needs fraction-train=1.0 (got {self.fraction_train}): "
                "Flower's client-level accountant has no amplification by client sampling, "
                "and its wrapper expects every client in every round"
            )


def machine_memory() -> int:
    """Bytes of physical memory of this machine (no psutil: the standard library's sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_synthetic_memory(num_synthetic: int) -> None:
    """Refuse a ``num-synthetic`` whose images cannot fit in a client's memory."""
    need = num_synthetic * BYTES_PER_SYNTHETIC_IMAGE
    memory = machine_memory()
    allowed = int(memory * SYNTHETIC_MEMORY_SHARE)
    if need > allowed:
        most = allowed // BYTES_PER_SYNTHETIC_IMAGE
        raise ConfigError(
            f"run-config key 'num-synthetic' = {num_synthetic} needs about {need / 2**30:.1f} GiB "
            f"per client ({BYTES_PER_SYNTHETIC_IMAGE} bytes per image: kept as uint8, copied "
            f"to float32 for training), more than {SYNTHETIC_MEMORY_SHARE:.0%} of this "
            f"machine's {memory / 2**30:.1f} GiB; at most {most} fit"
        )


# Validation rules per key: (type, predicate, description of what is allowed).
_Rule = tuple[type, Any, str]


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _fraction_open(v: float) -> bool:
    return 0.0 < v < 1.0


def _fraction_closed(v: float) -> bool:
    return 0.0 <= v <= 1.0


def _any(_v: Any) -> bool:
    return True


_RULES: dict[str, _Rule] = {
    "seed": (int, _non_negative, "an integer >= 0"),
    "dataset": (str, DATASETS.__contains__, f"one of {list(DATASETS)}"),
    "data-dir": (str, _any, "a folder path (or empty)"),
    "binarize": (str, BINARIZE_MODES.__contains__, f"one of {list(BINARIZE_MODES)}"),
    "dirichlet-beta": (float, _positive, "a number > 0 (e.g. 0.1 .. 100)"),
    "min-partition-size": (int, lambda v: v >= 3, "an integer >= 3"),
    "partition-max-draws": (int, _positive, "an integer >= 1"),
    "val-fraction": (float, _fraction_open, "a number strictly between 0 and 1"),
    "test-fraction": (float, _fraction_open, "a number strictly between 0 and 1"),
    "cvae-rounds": (int, _positive, "an integer >= 1"),
    "cvae-local-epochs": (int, _positive, "an integer >= 1"),
    "cvae-lr": (float, _positive, "a number > 0"),
    "cvae-batch-size": (int, _positive, "an integer >= 1"),
    "cvae-latent-dim": (int, _positive, "an integer >= 1"),
    "cvae-kl-weight": (float, _non_negative, "a number >= 0 (1.0 = plain VAE)"),
    "cvae-recon-loss": (str, RECON_LOSSES.__contains__, f"one of {list(RECON_LOSSES)}"),
    "imputation": (str, IMPUTATIONS.__contains__, f"one of {list(IMPUTATIONS)}"),
    "num-synthetic": (int, _non_negative, "an integer >= 0"),
    "generation-batch-size": (int, _positive, "an integer >= 1"),
    "synthetic-binarize": (str, BINARIZATIONS.__contains__, f"one of {list(BINARIZATIONS)}"),
    "minority-rounding": (
        str,
        MINORITY_ROUNDINGS.__contains__,
        f"one of {list(MINORITY_ROUNDINGS)}",
    ),
    "synthetic-refresh": (str, REFRESH.__contains__, f"one of {list(REFRESH)}"),
    "client-split-refresh": (str, REFRESH.__contains__, f"one of {list(REFRESH)}"),
    "fedavg-weights": (str, FEDAVG_WEIGHTS.__contains__, f"one of {list(FEDAVG_WEIGHTS)}"),
    "clf-rounds": (int, _positive, "an integer >= 1"),
    "clf-local-epochs": (int, _positive, "an integer >= 1"),
    "clf-optimizer": (str, OPTIMIZERS.__contains__, f"one of {list(OPTIMIZERS)}"),
    "clf-lr": (float, _positive, "a number > 0"),
    "clf-momentum": (float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "clf-weight-decay": (float, _non_negative, "a number >= 0"),
    "clf-batch-size": (int, _positive, "an integer >= 1"),
    "clf-compile": (bool, _any, "true (local epochs run a torch.compile'd model) or false"),
    "clf-aggregation": (str, AGGREGATIONS.__contains__, f"one of {list(AGGREGATIONS)}"),
    "clf-trim-fraction": (float, lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)"),
    "clf-krum-malicious": (int, _non_negative, "an integer >= 0"),
    "proximal-mu": (float, _non_negative, "a number >= 0 (0: FedAvg's local objective)"),
    "clf-strategy": (str, CLF_STRATEGIES.__contains__, f"one of {list(CLF_STRATEGIES)}"),
    "clf-fedavgm-lr": (float, _positive, "a number > 0 (Flower's default 1.0)"),
    "clf-fedavgm-momentum": (float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "clf-fedadam-eta": (float, _positive, "a number > 0 (Flower's default 0.1)"),
    "clf-fedadam-tau": (float, _positive, "a number > 0 (Flower's default 0.001)"),
    "clf-fedadam-beta1": (float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "clf-fedadam-beta2": (float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "eval-batch-size": (int, _positive, "an integer >= 1"),
    "bn-recalibration-images": (
        int,
        _non_negative,
        "an integer >= 0 (0: off; else real training images to re-measure BatchNorm on)",
    ),
    "pretrain": (str, PRETRAIN_MODES.__contains__, f"one of {list(PRETRAIN_MODES)}"),
    "pretrain-samples": (int, lambda v: v >= 20, "an integer >= 20"),
    "pretrain-epochs": (int, _positive, "an integer >= 1"),
    "pretrain-lr": (float, _positive, "a number > 0"),
    "pretrain-weight-decay": (float, _non_negative, "a number >= 0"),
    "pretrain-batch-size": (int, _positive, "an integer >= 1"),
    "finetune-rounds": (int, _positive, "an integer >= 1"),
    "finetune-local-epochs": (int, _positive, "an integer >= 1"),
    "quality-samples": (int, lambda v: v == 0 or v >= 20, "0 (no quality check) or >= 20"),
    "quality-epochs": (int, _positive, "an integer >= 1"),
    "fraction-train": (float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "fraction-evaluate": (float, _fraction_closed, "a number in [0, 1]"),
    "evaluate-on-receipt": (bool, _any, "true or false"),
    "sim-message-index": (bool, _any, "true (index each node's messages, simulation) or false"),
    "min-clients": (int, _positive, "an integer >= 1"),
    "round-timeout": (float, _positive, "a number of seconds > 0"),
    "output-dir": (str, _any, "a folder path (or empty for a timestamped one)"),
    "tensorboard": (bool, _any, "true (TensorBoard files in <output-dir>/tensorboard) or false"),
    "privacy-audit": (bool, _any, "true (audit and attacks on every client) or false"),
    "cvae-dp": (str, CVAE_DP_MODES.__contains__, f"one of {list(CVAE_DP_MODES)}"),
    "cvae-dp-noise": (float, _non_negative, "a number >= 0 (0: derived from cvae-dp-epsilon)"),
    "cvae-dp-clip": (float, _positive, "a number > 0"),
    "cvae-dp-delta": (float, _fraction_open, "a number strictly between 0 and 1"),
    "cvae-dp-epsilon": (float, _non_negative, "a number >= 0 (0: no budget)"),
}
_KEYS = {key: key.replace("-", "_") for key in _RULES}
assert set(_KEYS.values()) == {f.name for f in dataclasses.fields(AppConfig)}


def _check(key: str, value: Any) -> Any:
    kind, allowed, description = _RULES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML `lr=1` arrives as an int
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(
            f"run-config key '{key}' must be {description}; got {value!r} ({type(value).__name__})"
        )
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"run-config key '{key}' must be {description}; got {value!r}")
    if not allowed(value):
        raise ConfigError(f"run-config key '{key}' must be {description}; got {value!r}")
    return value


@cache
def default_run_config() -> dict[str, Any]:
    """The defaults from ``[tool.flwr.app.config]`` in the app's pyproject.toml."""
    with PYPROJECT.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
