"""The study's settings as run-config values: as its paper writes them ("as-written", the
app's defaults) and as its authors' code ran them ("as-run"); docs/study.md gives the
evidence for every value.

A preset covers what the study fixed about its method (optimizers, rounds, the split
rule, how synthetic images are made and weighted), not the scale of a run (data set,
number of clients, beta, k, seed). ``conf/study-as-written.toml`` and
``conf/study-as-run.toml`` hold the same values for ``flwr run --run-config <file>``;
an experiment file picks one with ``preset: as-run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Shared by both: what the paper states and the code runs alike.
_COMMON: dict[str, Any] = {
    "min-partition-size": 40,
    "val-fraction": 0.1,
    "test-fraction": 0.1,
    "fraction-train": 1.0,
    "cvae-rounds": 15,
    "cvae-local-epochs": 1,
    "cvae-lr": 0.001,
    "cvae-batch-size": 32,
    "cvae-latent-dim": 3,
    "cvae-kl-weight": 1.0,
    "synthetic-binarize": "rescale",
    "fedavg-weights": "real",
    "clf-rounds": 15,
    "clf-local-epochs": 1,
    "clf-lr": 0.01,
    "clf-momentum": 0.5,
    "pretrain-samples": 70000,
    "pretrain-epochs": 15,
    "pretrain-batch-size": 32,
}

AS_WRITTEN: dict[str, Any] = {
    **_COMMON,
    "cvae-recon-loss": "bce",  # the paper names no CVAE loss; BCE suits 0/1 pixels
    "minority-rounding": "nearest",
    "synthetic-refresh": "once",
    "client-split-refresh": "once",
    "clf-optimizer": "adam",
    "clf-weight-decay": 0.0001,
    "clf-batch-size": 32,
    "pretrain-lr": 0.01,
    "pretrain-weight-decay": 0.0001,
    "finetune-rounds": 15,
    "finetune-local-epochs": 8,
}

AS_RUN: dict[str, Any] = {
    **_COMMON,
    "cvae-recon-loss": "sse",
    "minority-rounding": "up",
    "synthetic-refresh": "every-round",
    "client-split-refresh": "every-round",
    "clf-optimizer": "sgd",
    "clf-weight-decay": 0.0,
    "clf-batch-size": 10,
    "pretrain-lr": 0.001,
    "pretrain-weight-decay": 0.0,
    "finetune-rounds": 8,
    "finetune-local-epochs": 1,
}

PRESETS: dict[str, dict[str, Any]] = {"as-written": AS_WRITTEN, "as-run": AS_RUN}
CUSTOM = "custom"


class PresetError(ValueError):
    """An unknown preset name."""


def preset_values(name: str) -> dict[str, Any]:
    """The run-config values of a named preset."""
    if name not in PRESETS:
        raise PresetError(f"unknown study preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def _differences(run_config: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, list]:
    return {
        key: [run_config.get(key), value]
        for key, value in preset.items()
        if run_config.get(key) != value  # 0.0 == 0: config values are normalized anyway
    }


def matching_preset(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Which preset a run's config follows: ``{"name": "as-run"}`` when it has every
    value of one, else ``{"name": "custom", "nearest": ..., "differs": {key: [this
    run's value, the preset's]}}`` against the preset it differs from least."""
    differences = {name: _differences(run_config, values) for name, values in PRESETS.items()}
    nearest = min(differences, key=lambda name: len(differences[name]))
    if not differences[nearest]:
        return {"name": nearest}
    return {"name": CUSTOM, "nearest": nearest, "differs": differences[nearest]}
