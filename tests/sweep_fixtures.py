"""Sweep folders with known numbers, shaped like the app's real ``summary.json``.

The shape follows ``fedaug_flwr.pipeline`` (classifier rounds with aggregated
``evaluate`` and ``global-test``, ``clients`` with label counts, ``final``)
and, for pretraining, the finetune variant's contract
(``pretraining.epochs`` and ``pretraining.pretrained.clients``); runs with a CVAE
carry the generator-quality check (``generator-quality``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedaug_flwr.config import AppConfig
from fedaug_flwr.experiments.grid import SweepSpec, parse_spec
from fedaug_flwr.experiments.runner import run_dir, write_spec
from fedaug_flwr.results import FAILURE, SUMMARY, write_json

NUM_CLIENTS = 3
# Client 0's real label counts; the same in every fixture run of a beta.
BEFORE = [50, 40, 30, 20, 10, 5, 5, 5, 5, 5]


def metrics(f1: float, loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "accuracy": f1 + 0.1,
        "macro-f1": f1,
        "micro-f1": f1 + 0.1,  # equal to accuracy, as for any single-label prediction
        "macro-f1-present": f1 + 0.02,
        "macro-f1-all": f1 - 0.02,
    }


def generator_quality(f1: float) -> dict[str, Any]:
    """The quick check: trained on synthetic images ``f1`` - 0.2 macro-F1, the real-image
    reference ``f1`` (accuracy 0.1 higher each), Fréchet distance 10 * ``f1``."""
    synthetic, real = metrics(f1 - 0.2, 1.0), metrics(f1, 0.5)
    return {
        "classifier": "ExquisiteNetV1 trained on 120 synthetic images ...",
        "real-test": synthetic,
        "reference": {"real-test": real},
        "gap": {m: real[m] - synthetic[m] for m in ("accuracy", "macro-f1")},
        "fidelity": {"frechet-distance": 10 * f1, "coverage": f1 / 2},
    }


def aggregated(f1: float, loss: float) -> dict[str, float]:
    base = metrics(f1, loss)
    return {
        "num-clients": float(NUM_CLIENTS),
        **base,
        **{f"{k}-weighted": v + 0.01 for k, v in base.items()},
    }


def fake_summary(
    run_config: dict[str, Any],
    f1: float,
    loss: float,
    round_losses: list[float] | None = None,
    pretraining: dict[str, Any] | None = None,
    preset: str | None = None,
) -> dict[str, Any]:
    """A summary whose final client macro-F1 is ``f1`` and test loss ``loss``; with a
    ``study-preset`` when ``preset`` is given (older summaries have none)."""
    known = {k: v for k, v in run_config.items() if not k.startswith(("pretrain", "finetune"))}
    config = {**AppConfig.from_run_config(known).to_run_config(), **run_config}
    imputation = config["imputation"]
    k = 0 if imputation == "none" else int(config["num-synthetic"])
    synthetic = [0] * 10
    if k:
        deficit = [max(BEFORE) - c for c in BEFORE]
        synthetic = [round(k * d / sum(deficit)) for d in deficit]
    round_losses = round_losses or [loss + 0.5, loss]
    clients = [
        {
            "partition-id": pid,
            "real-train": 100,
            "val": 12,
            "test": 12,
            "synthetic-train": k,
            "label-counts-before": BEFORE,
            "label-counts-synthetic": synthetic,
            "label-counts-after": [a + b for a, b in zip(BEFORE, synthetic, strict=True)],
            "final-test": {**metrics(f1, loss), "num-examples": 12},
        }
        for pid in range(NUM_CLIENTS)
    ]
    summary = {
        "status": "completed",
        "run-id": 1,
        "config": config,
        "data": {"source": "mnist-5k", "location": "", "num-clients": NUM_CLIENTS},
        "cvae": {"rounds": [{"round": 1, "train": {"train-loss": 200.0, "val-loss": 190.0}}]},
        "imputation": {"mode": imputation, "num-synthetic-per-client": k},
        "classifier": {
            "rounds": [
                {
                    "round": r,
                    "train": {"num-clients": 3.0, "train-loss": round_loss + 0.1},
                    "evaluate": aggregated(f1 - 0.1 * (len(round_losses) - r), round_loss),
                    "global-test": metrics(f1, round_loss),
                }
                for r, round_loss in enumerate(round_losses, start=1)
            ]
        },
        "clients": clients,
        "final": {"clients": aggregated(f1, loss), "global-test": metrics(f1 + 0.05, loss)},
        "timing-s": {"total": 30.0},
    }
    if pretraining is not None:
        summary["pretraining"] = pretraining
    if k or pretraining is not None:  # a CVAE was trained
        summary["generator-quality"] = generator_quality(f1)
    if preset is not None:
        summary["study-preset"] = preset
    return summary


def fake_pretraining(train_loss: float, real_loss: float, pretrained_f1: float) -> dict:
    return {
        "epochs": [
            {
                "epoch": e,
                "train-loss": train_loss * (3 - e),
                "synthetic-test": metrics(0.9, train_loss * 2),
                "real-test": metrics(0.5, real_loss + (2 - e)),
            }
            for e in (1, 2)
        ],
        "pretrained": {
            "clients": aggregated(pretrained_f1, real_loss),
            "global-test": metrics(pretrained_f1 + 0.05, real_loss),
        },
    }


IMPUTATION_SPEC = {
    "name": "fixture",
    "federation": {"num-supernodes": 3},
    "base": {"cvae-rounds": 1, "clf-rounds": 2},
    "axes": {
        "dirichlet-beta": [0.1, 10.0],
        "imputation": ["none", "uniform", "minority"],
        "num-synthetic": [0, 100],
    },
    "exclude": [
        {"imputation": "none", "num-synthetic": 100},
        {"imputation": ["uniform", "minority"], "num-synthetic": 0},
    ],
    "seeds": [0, 1, 2],
}

# Final client macro-F1 per (beta, imputation) for seeds 0, 1, 2.
F1 = {
    (0.1, "none"): [0.5, 0.6, 0.7],
    (0.1, "uniform"): [0.55, 0.65, 0.75],
    (0.1, "minority"): [0.6, 0.7, 0.8],
    (10.0, "none"): [0.8, 0.8, 0.8],
    (10.0, "uniform"): [0.82, 0.84, 0.86],
    (10.0, "minority"): [0.9, 0.9, 0.9],
}


def imputation_sweep(folder: Path) -> SweepSpec:
    """A complete fixture imputation sweep: 6 cells x 3 seeds with the F1 table above."""
    spec = parse_spec(IMPUTATION_SPEC)
    write_spec(folder, spec)
    for run in spec.runs():
        cell = run.cell.as_dict()
        f1 = F1[(cell["dirichlet-beta"], cell["imputation"])][run.seed]
        write_json(
            run_dir(folder, run) / SUMMARY,
            fake_summary(run.run_config, f1=f1, loss=1.0 + run.seed),
        )
    return spec


FINETUNE_SPEC = {
    "name": "fixture-finetune",
    "federation": {"num-supernodes": 3},
    "base": {"imputation": "none", "num-synthetic": 0},
    "axes": {"dirichlet-beta": [0.1, 100.0], "pretrain": ["off", "federated"]},
    "seeds": [0, 1],
}


def finetune_sweep(folder: Path) -> SweepSpec:
    """Vanilla (off) and pretrained/fine-tuned (federated) runs with known numbers."""
    spec = parse_spec(FINETUNE_SPEC)
    write_spec(folder, spec)
    for run in spec.runs():
        cell = run.cell.as_dict()
        if cell["pretrain"] == "off":
            summary = fake_summary(
                run.run_config, f1=0.6 + run.seed / 10, loss=1.0, preset="as-written"
            )
        else:
            summary = fake_summary(
                run.run_config,
                f1=0.7 + run.seed / 10,
                loss=0.8,
                pretraining=fake_pretraining(0.01 * (1 + run.seed), 1.5 + run.seed, 0.3),
                preset="as-written",
            )
        write_json(run_dir(folder, run) / SUMMARY, summary)
    return spec


def write_failure(folder: Path, error: str = "PhaseError: boom") -> None:
    write_json(folder / FAILURE, {"status": "failed", "error": error})


PRIVACY_SPEC = {
    "name": "fixture-privacy",
    "federation": {"num-supernodes": 3},
    "base": {"cvae-dp-noise": 0.0},
    "axes": {
        "cvae-dp": ["off", "sample"],
        "cvae-dp-epsilon": [0.0, 8.0, 1.0],
        "imputation": ["minority", "none"],
        "num-synthetic": [100, 0],
    },
    "exclude": [
        {"cvae-dp": "off", "cvae-dp-epsilon": [8.0, 1.0]},
        {"cvae-dp": "sample", "cvae-dp-epsilon": 0.0},
        {"imputation": "minority", "num-synthetic": 0},
        {"imputation": "none", "num-synthetic": 100},
        {"imputation": "none", "cvae-dp": "sample"},
    ],
    "seeds": [0, 1, 2],
}

# Final client macro-F1 per budget (0.0: no DP) for seeds 0, 1, 2; the loss-attack AUC
# and flagged share fall with the budget.
PRIVACY_F1 = {0.0: [0.6, 0.7, 0.8], 8.0: [0.58, 0.69, 0.77], 1.0: [0.4, 0.45, 0.65]}
PRIVACY_AUC = {0.0: 0.6, 8.0: 0.55, 1.0: 0.5}
PRIVACY_F1_NONE = [0.45, 0.55, 0.75]  # the reference: no synthetic images (no CVAE)


def privacy_section(auc: float, flagged: float) -> dict[str, Any]:
    """``summary.json``'s ``privacy`` section as ``pipeline`` writes it (the parts the
    tables read)."""
    attack = {"clients": NUM_CLIENTS, "mean": auc, "std": 0.01, "pooled": None}
    return {
        "audit": {
            "clients": NUM_CLIENTS,
            "flagged-share": flagged,
            "flagged-share-reference": 0.05,
            "flagged-excess-mean": flagged - 0.05,
            "exact-copies": 0,
        },
        "membership-inference": {"loss": attack, "generated-nearest": {**attack, "mean": 0.5}},
    }


def privacy_sweep(folder: Path) -> SweepSpec:
    """Runs without DP and with sample-level DP at two budgets, and the reference without
    synthetic images, with known numbers."""
    spec = parse_spec(PRIVACY_SPEC)
    write_spec(folder, spec)
    for run in spec.runs():
        cell = run.cell.as_dict()
        if cell["imputation"] == "none":
            summary = fake_summary(run.run_config, f1=PRIVACY_F1_NONE[run.seed], loss=1.0)
            write_json(run_dir(folder, run) / SUMMARY, summary)
            continue
        budget = cell["cvae-dp-epsilon"]
        summary = fake_summary(run.run_config, f1=PRIVACY_F1[budget][run.seed], loss=1.0)
        summary["privacy"] = privacy_section(PRIVACY_AUC[budget], flagged=0.05 + budget / 100)
        if cell["cvae-dp"] == "sample":
            summary["cvae"]["dp"] = {"mode": "sample", "epsilon": budget * 0.99}
        write_json(run_dir(folder, run) / SUMMARY, summary)
    return spec


STRATEGIES_SPEC = {
    "name": "fixture-strategies",
    "federation": {"num-supernodes": 3},
    "base": {"dirichlet-beta": 0.1},
    "axes": {
        "clf-strategy": ["fedavg", "fedprox"],
        "proximal-mu": [0.0, 0.01],
        "imputation": ["none", "minority"],
        "num-synthetic": [0, 100],
    },
    "exclude": [
        {"clf-strategy": "fedavg", "proximal-mu": 0.01},
        {"clf-strategy": "fedprox", "proximal-mu": 0.0},
        {"imputation": "none", "num-synthetic": 100},
        {"imputation": "minority", "num-synthetic": 0},
    ],
    "seeds": [0, 1, 2],
}

# Final client macro-F1 per (strategy, imputation) for seeds 0, 1, 2: FedProx +0.05 over
# FedAvg; synthetic images +0.1 under FedAvg, +0.07/0.09/0.08 under FedProx.
STRATEGIES_F1 = {
    ("fedavg", "none"): [0.5, 0.6, 0.7],
    ("fedavg", "minority"): [0.6, 0.7, 0.8],
    ("fedprox", "none"): [0.55, 0.65, 0.75],
    ("fedprox", "minority"): [0.62, 0.74, 0.83],
}


def strategies_sweep(folder: Path) -> SweepSpec:
    """FedAvg and FedProx, each with and without synthetic images, with known numbers."""
    spec = parse_spec(STRATEGIES_SPEC)
    write_spec(folder, spec)
    for run in spec.runs():
        cell = run.cell.as_dict()
        f1 = STRATEGIES_F1[(cell["clf-strategy"], cell["imputation"])][run.seed]
        write_json(run_dir(folder, run) / SUMMARY, fake_summary(run.run_config, f1=f1, loss=1.0))
    return spec
