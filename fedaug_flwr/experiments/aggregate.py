"""Tidy tables from a sweep folder: one row per run, and mean / std / n per cell.

Reads ``summary.json`` of every run of the sweep's grid (``sweep.yaml`` in the
folder says which) and writes CSV files to ``<sweep folder>/tables/``:

- ``final_runs.csv`` / ``final_cells.csv``: final metrics of the classifier
  (client test splits: unweighted mean over clients, as the study reports, and
  example-weighted; the global test set; every metric of
  :data:`~fedaug_flwr.metrics.METRIC_NAMES`; the global accuracy and the clients'
  macro-F1 averaged over the last 3 rounds), with pretraining numbers when the
  run had them, the generator-quality check's (``quality-*``), the privacy audit's
  and attacks' (``privacy-*``) and the epsilon the CVAE's DP spent (``cvae-dp-epsilon-spent``);
- ``rounds_runs.csv`` / ``rounds_cells.csv``: per-round curves, one row per
  (phase, round): ``cvae`` (train / validation loss), ``classifier`` (train
  loss, client test and global test metrics) and ``pretraining`` (one row
  per epoch);
- ``clients_runs.csv``: per client and run: data sizes, label counts before
  and after imputation, final test metrics;
- ``status.csv``: every run of the grid and whether it is complete.

Standard deviations are sample standard deviations over seeds (ddof=1), empty
when a cell has a single seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedaug_flwr.data import NUM_CLASSES
from fedaug_flwr.experiments.grid import Run, SweepSpec
from fedaug_flwr.experiments.runner import read_spec, run_dir, statuses
from fedaug_flwr.metrics import METRIC_NAMES
from fedaug_flwr.results import read_summary, write_atomic

TABLES_DIR = "tables"
# Config values that name what a run studied; kept as columns even when not swept.
STUDY_KEYS = (
    "dataset",
    "dirichlet-beta",
    "imputation",
    "num-synthetic",
    "pretrain",
    "clf-strategy",  # the classifier's server strategy (summaries before it lack the key)
)
# What a summary made before its key existed ran: without it a cell whose older seeds lack
# the key would be two cells in ``final_cells`` (the older seeds', the newer seeds').
BEFORE_THE_KEY = {"clf-strategy": "fedavg"}  # the classifier's only strategy then
# The preset a run's config matches (summary.json's own key; older summaries lack it).
PRESET_KEY = "study-preset"
# Columns the figures and the claims read.
BETA, MODE, K = "dirichlet-beta", "imputation", "num-synthetic"
IMPUTATION_MODES = ("uniform", "minority")
F1 = "test-macro-f1"
# Rounds at the end of the classifier phase averaged by ``last_rounds_columns``.
LAST_ROUNDS = 3


class FigureError(ValueError):
    """The tables do not hold what a figure (or the claims) needs."""


@dataclass
class Tables:
    """All tables of one sweep, as pandas DataFrames."""

    final_runs: pd.DataFrame
    final_cells: pd.DataFrame
    rounds_runs: pd.DataFrame
    rounds_cells: pd.DataFrame
    clients_runs: pd.DataFrame
    status: pd.DataFrame

    def items(self) -> Iterable[tuple[str, pd.DataFrame]]:
        return {
            "final_runs": self.final_runs,
            "final_cells": self.final_cells,
            "rounds_runs": self.rounds_runs,
            "rounds_cells": self.rounds_cells,
            "clients_runs": self.clients_runs,
            "status": self.status,
        }.items()


# ------------------------------------------------------------------- one summary


def _metrics(prefix: str, values: Mapping[str, Any] | None, weighted: bool = False) -> dict:
    row: dict[str, float] = {}
    for name in METRIC_NAMES:
        for suffix in ("", "-weighted") if weighted else ("",):
            key = f"{name}{suffix}"
            if values is not None and values.get(key) is not None:
                row[f"{prefix}{key}"] = float(values[key])
    return row


def final_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Final numbers of one run, flat (no identifying columns)."""
    clients = summary.get("clients", [])
    real = sum(int(c["real-train"]) for c in clients)
    synthetic = sum(int(c["synthetic-train"]) for c in clients)
    row: dict[str, Any] = {
        "num-clients": len(clients),
        "real-train-per-client": real / len(clients) if clients else float("nan"),
        "synthetic-per-client": summary.get("imputation", {}).get("num-synthetic-per-client", 0),
        "synthetic-fraction": synthetic / (real + synthetic) if real + synthetic else float("nan"),
        **_metrics("test-", summary["final"]["clients"], weighted=True),
        **_metrics("global-test-", summary["final"].get("global-test")),
        **_metrics("global-test-recalibrated-", summary["final"].get("global-test-recalibrated")),
    }
    row.update(last_rounds_columns(summary))
    row.update(quality_columns(summary))
    row.update(privacy_columns(summary))
    pretraining = summary.get("pretraining")
    if pretraining:
        row.update(_metrics("pretrained-test-", pretraining["pretrained"]["clients"], True))
        row.update(
            _metrics("pretrained-global-test-", pretraining["pretrained"].get("global-test"))
        )
        epochs = pretraining.get("epochs") or []
        if epochs:
            last = epochs[-1]
            row["pretrain-epochs"] = len(epochs)
            row["pretrain-train-loss"] = float(last["train-loss"])
            row.update(_metrics("pretrain-synthetic-test-", last.get("synthetic-test")))
            row.update(_metrics("pretrain-real-test-", last.get("real-test")))
    row["seconds"] = float(summary.get("timing-s", {}).get("total", float("nan")))
    return row


def last_rounds_columns(summary: Mapping[str, Any], rounds: int = LAST_ROUNDS) -> dict:
    """The global model's test accuracy and the clients' test macro-F1, each the mean over
    the classifier's last ``rounds`` rounds (``...-last3``): a final number less at the
    mercy of one round's swing. Only for runs with that many rounds measured."""
    entries = summary.get("classifier", {}).get("rounds", [])[-rounds:]
    sources = {
        f"global-test-accuracy-last{rounds}": ("global-test", "accuracy"),
        f"test-macro-f1-last{rounds}": ("evaluate", "macro-f1"),
    }
    row: dict[str, float] = {}
    for column, (part, metric) in sources.items():
        values = [(entry.get(part) or {}).get(metric) for entry in entries]
        if len(values) == rounds and all(v is not None for v in values):
            row[column] = float(sum(values) / rounds)
    return row


def quality_columns(summary: Mapping[str, Any]) -> dict[str, float]:
    """The generator-quality check: real-test scores of the classifier trained on synthetic
    images and of its real-image reference, the gap, Fréchet distance and mean coverage."""
    quality = summary.get("generator-quality") or {}
    if summary.get("pretraining") and "reference" not in quality:
        return {}  # an older summary: these were the pretrained model's scores
    reference, fidelity = quality.get("reference") or {}, quality.get("fidelity") or {}
    sources = {
        "quality-synthetic-": quality.get("real-test"),
        "quality-real-": reference.get("real-test"),
        "quality-gap-": quality.get("gap"),
    }
    row: dict[str, float] = {}
    for prefix, scores in sources.items():
        for metric in ("accuracy", "macro-f1"):
            if scores and scores.get(metric) is not None:
                row[f"{prefix}{metric}"] = float(scores[metric])
    for key in ("frechet-distance", "coverage"):
        if key in fidelity:  # coverage is None when no class had enough real images
            value = fidelity[key]
            row[f"quality-{key}"] = float("nan") if value is None else float(value)
    return row


def privacy_columns(summary: Mapping[str, Any]) -> dict[str, float]:
    """The privacy audit pooled over clients (flagged share beside its held-out reference,
    the per-client excess over chance, exact copies), the attacks' mean AUC over clients,
    and the epsilon the CVAE's DP spent (worst client, after the last round)."""
    row: dict[str, float] = {}
    privacy = summary.get("privacy") or {}
    audit = privacy.get("audit") or {}
    for key in ("flagged-share", "flagged-share-reference", "flagged-excess-mean"):
        if audit.get(key) is not None:
            row[f"privacy-{key}"] = float(audit[key])
    if "exact-copies" in audit:
        row["privacy-exact-copies"] = float(audit["exact-copies"])
    for attack, result in (privacy.get("membership-inference") or {}).items():
        if result.get("mean") is not None:
            row[f"privacy-auc-{attack}"] = float(result["mean"])
    dp = (summary.get("cvae") or {}).get("dp") or {}
    if dp.get("mode") in ("sample", "client"):
        row["cvae-dp-epsilon-spent"] = float(dp["epsilon"])  # beside the budget key
    return row


def round_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-round (and per-epoch) numbers of one run: cvae, pretraining, classifier."""
    rows: list[dict[str, Any]] = []
    for entry in summary.get("cvae", {}).get("rounds", []):
        train = entry.get("train", {})
        rows.append(
            {
                "phase": "cvae",
                "round": int(entry["round"]),
                **{k: float(train[k]) for k in ("train-loss", "val-loss") if k in train},
            }
        )
    for entry in (summary.get("pretraining") or {}).get("epochs", []):
        rows.append(
            {
                "phase": "pretraining",
                "round": int(entry["epoch"]),
                "train-loss": float(entry["train-loss"]),
                **_metrics("synthetic-test-", entry.get("synthetic-test")),
                **_metrics("real-test-", entry.get("real-test")),
            }
        )
    for entry in summary.get("classifier", {}).get("rounds", []):
        train = entry.get("train", {})
        row = {"phase": "classifier", "round": int(entry["round"])}
        if "train-loss" in train:
            row["train-loss"] = float(train["train-loss"])
        row.update(_metrics("test-", entry.get("evaluate"), weighted=True))
        row.update(_metrics("global-test-", entry.get("global-test")))
        row.update(_metrics("global-test-recalibrated-", entry.get("global-test-recalibrated")))
        rows.append(row)
    return rows


def client_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per client: sizes, label counts before / synthetic / after, final metrics."""
    rows = []
    for client in summary.get("clients", []):
        row: dict[str, Any] = {
            key: int(client[key])
            for key in ("partition-id", "real-train", "val", "test", "synthetic-train")
        }
        for which in ("before", "synthetic", "after"):
            counts = client.get(f"label-counts-{which}", [0] * NUM_CLASSES)
            row.update({f"{which}-{label}": int(c) for label, c in enumerate(counts)})
        row.update(_metrics("test-", client.get("final-test")))
        rows.append(row)
    return rows


# ------------------------------------------------------------------- a whole sweep


def identity(spec: SweepSpec, run: Run, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The columns that say which run a row belongs to."""
    config = summary.get("config", {})
    row: dict[str, Any] = {"cell": run.cell.name, **run.cell.as_dict()}
    for key in STUDY_KEYS:
        if key not in row and key in config:
            row[key] = config[key]
        elif key not in row and key in BEFORE_THE_KEY:
            row[key] = BEFORE_THE_KEY[key]
    preset = summary.get(PRESET_KEY)
    if isinstance(preset, Mapping):  # a preset described by more than its name
        preset = preset.get("name")
    if preset is not None and PRESET_KEY not in row:
        row[PRESET_KEY] = str(preset)
    row["seed"] = run.seed
    return row


def collect(spec: SweepSpec, sweep_dir: Path, runs: Sequence[Run] | None = None) -> Tables:
    """Read every complete run of ``runs`` (default: the whole grid) into tables."""
    runs = spec.runs() if runs is None else list(runs)
    finals, rounds, clients = [], [], []
    for run in runs:
        summary = read_summary(run_dir(sweep_dir, run))
        if summary is None:
            continue
        ident = identity(spec, run, summary)
        finals.append({**ident, **final_row(summary)})
        rounds.extend({**ident, **row} for row in round_rows(summary))
        clients.extend({**ident, **row} for row in client_rows(summary))
    id_columns = _id_columns(spec, finals)
    final_runs = pd.DataFrame(finals, columns=_ordered(finals, id_columns))
    rounds_runs = pd.DataFrame(rounds, columns=_ordered(rounds, [*id_columns, "phase", "round"]))
    clients_runs = pd.DataFrame(clients, columns=_ordered(clients, [*id_columns, "partition-id"]))
    cell_keys = [c for c in id_columns if c != "seed"]
    return Tables(
        final_runs=final_runs,
        final_cells=over_seeds(final_runs, cell_keys),
        rounds_runs=rounds_runs,
        rounds_cells=over_seeds(rounds_runs, [*cell_keys, "phase", "round"]),
        clients_runs=clients_runs,
        status=pd.DataFrame(
            statuses(sweep_dir, runs), columns=["cell", "seed", "folder", "status", "error"]
        ),
    )


def _id_columns(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    known = (*STUDY_KEYS, PRESET_KEY)
    extra = [k for k in known if k not in spec.axes and any(k in r for r in rows)]
    return ["cell", *spec.axes, *extra, "seed"]


def _ordered(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> list[str]:
    """``first``, then every other column in order of first appearance."""
    columns = list(first)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def over_seeds(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std and n of every numeric column per group of ``keys``."""
    metrics = [
        c
        for c in table.columns
        if c not in (*keys, "seed") and pd.api.types.is_numeric_dtype(table[c])
    ]
    columns = [*keys, "n", *(f"{m}-{s}" for m in metrics for s in ("mean", "std"))]
    if table.empty:
        return pd.DataFrame(columns=columns)
    grouped = table.groupby(list(keys), dropna=False, sort=False)
    stats = grouped[metrics].agg(["mean", "std"])
    stats.columns = [f"{metric}-{stat}" for metric, stat in stats.columns]
    stats.insert(0, "n", grouped.size())
    return stats.reset_index()[columns]


def save_tables(tables: Tables, sweep_dir: Path) -> dict[str, Path]:
    """Write every table as ``<sweep folder>/tables/<name>.csv``; returns name -> path."""
    paths = {}
    for name, frame in tables.items():
        path = Path(sweep_dir) / TABLES_DIR / f"{name}.csv"
        paths[name] = write_atomic(path, lambda tmp, f=frame: f.to_csv(tmp, index=False))
    return paths


def write_tables(sweep_dir: Path) -> Tables:
    """Aggregate a sweep folder (its ``sweep.yaml`` grid) and write its CSV tables."""
    tables = collect(read_spec(sweep_dir), Path(sweep_dir))
    save_tables(tables, sweep_dir)
    return tables


def read_tables(sweep_dir: Path) -> Tables:
    """The CSV tables written by :func:`write_tables`."""
    folder = Path(sweep_dir) / TABLES_DIR
    frames = {}
    for name in Tables.__dataclass_fields__:
        path = folder / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the 'aggregate' step first")
        try:
            frames[name] = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            frames[name] = pd.DataFrame()
    return Tables(**frames)


def is_baseline(table: pd.DataFrame) -> pd.Series:
    return (table[MODE] == "none") | (table[K] == 0)


def imputation_curve(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Rows of one imputation mode plus the no-synthetic baseline as its k = 0 (runs
    without synthetic images are the k = 0 point of both the uniform and minority curves).
    Runs with pretraining (the finetune variant) are not on the curves: their k = 0 is not
    the study's vanilla FedAvg."""
    if "pretrain" in table:
        table = table[table["pretrain"].astype(str) == "off"]
    rows = table[(table[MODE] == mode) & ~is_baseline(table)]
    baseline = table[is_baseline(table)].copy()
    baseline[K] = 0
    return pd.concat([baseline, rows], ignore_index=True)


def require_one_cell_per_point(curve: pd.DataFrame, what: str) -> None:
    """A :class:`FigureError` when several cells share one (beta, k) point of an
    :func:`imputation_curve`: the sweep varies more than beta, imputation and k (e.g.
    ``cvae-dp`` or ``clf-strategy``), and a figure or claim of the study would silently
    average over it."""
    if "cell" not in curve or curve.empty:
        return
    cells = curve.groupby([BETA, K])["cell"].unique()
    shared = cells[cells.map(len) > 1]
    if not shared.empty:
        (beta, k), names = shared.index[0], sorted(shared.iloc[0])
        raise FigureError(
            f"{what}: {len(names)} cells at beta={beta:g}, k={int(k)} ({', '.join(names)}); "
            "the sweep varies more than beta, imputation and k, which the study's figures "
            "and claims would average over"
        )


def require_one_cell(runs: pd.DataFrame, what: str) -> None:
    """A :class:`FigureError` when ``runs`` (one arm, e.g. the fine-tuned model, at one
    beta) come from several cells: pairing by seed would pair a run with each of them,
    and a level or a bar would mix them (e.g. another ``clf-strategy``)."""
    names = sorted(runs["cell"].astype(str).unique()) if "cell" in runs else []
    if len(names) > 1:
        raise FigureError(
            f"{what}: {len(names)} cells ({', '.join(names)}); the sweep varies more than "
            "beta and pretraining, which the finetune comparison would average over"
        )
