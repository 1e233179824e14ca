"""Aggregation of fixture sweep folders with known numbers into tidy CSV tables."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from fedaug_flwr.experiments import __main__ as cli
from fedaug_flwr.experiments.aggregate import TABLES_DIR, final_row, read_tables, write_tables
from fedaug_flwr.experiments.grid import SweepError
from fedaug_flwr.experiments.runner import run_dir
from fedaug_flwr.metrics import METRIC_NAMES
from fedaug_flwr.results import SUMMARY, write_json
from tests.sweep_fixtures import (
    BEFORE,
    fake_pretraining,
    fake_summary,
    finetune_sweep,
    imputation_sweep,
    write_failure,
)

CELL = "dirichlet-beta=0.1__imputation=none__num-synthetic=0"


def row(table: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for key, value in where.items():
        mask &= table[key] == value
    assert mask.sum() == 1, f"{mask.sum()} rows match {where}"
    return table[mask].iloc[0]


def test_one_row_per_run_and_mean_std_n_per_cell(tmp_path):
    imputation_sweep(tmp_path)
    tables = write_tables(tmp_path)
    assert len(tables.final_runs) == 18 and len(tables.final_cells) == 6
    run = row(tables.final_runs, cell=CELL, seed=1)
    assert run["test-macro-f1"] == pytest.approx(0.6)
    assert run["test-macro-f1-weighted"] == pytest.approx(0.61)
    assert run["test-loss"] == pytest.approx(2.0)
    assert run["global-test-macro-f1"] == pytest.approx(0.65)
    assert run["synthetic-fraction"] == 0.0 and run["num-clients"] == 3
    cell = row(tables.final_cells, cell=CELL)
    assert cell["n"] == 3
    assert cell["test-macro-f1-mean"] == pytest.approx(0.6)
    assert cell["test-macro-f1-std"] == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    assert cell["test-loss-mean"] == pytest.approx(2.0) and cell["test-loss-std"] == 1.0
    minority = row(tables.final_cells, **{"dirichlet-beta": 10.0, "imputation": "minority"})
    assert minority["test-macro-f1-std"] == pytest.approx(0.0)
    assert minority["synthetic-fraction-mean"] == pytest.approx(100 / 200)


def test_axis_columns_come_first_and_tables_land_as_csv(tmp_path):
    imputation_sweep(tmp_path)
    write_tables(tmp_path)
    final = pd.read_csv(tmp_path / TABLES_DIR / "final_runs.csv")
    # axes first, then the study's other keys (pretrain: the finetune variant; the server
    # strategy), then the seed
    columns = [
        "cell",
        "dirichlet-beta",
        "imputation",
        "num-synthetic",
        "dataset",
        "pretrain",
        "clf-strategy",
    ]
    assert list(final.columns[:8]) == [*columns, "seed"]
    cells = pd.read_csv(tmp_path / TABLES_DIR / "final_cells.csv")
    assert list(cells.columns[:8]) == [*columns, "n"]
    assert "seed" not in cells.columns
    assert {p.name for p in (tmp_path / TABLES_DIR).iterdir()} == {
        f"{name}.csv"
        for name in (
            "final_runs",
            "final_cells",
            "rounds_runs",
            "rounds_cells",
            "clients_runs",
            "status",
        )
    }
    assert read_tables(tmp_path).final_cells.shape == cells.shape


def test_per_round_curves_per_run_and_per_cell(tmp_path):
    imputation_sweep(tmp_path)
    tables = write_tables(tmp_path)
    rounds = tables.rounds_runs
    classifier = rounds[(rounds["cell"] == CELL) & (rounds["phase"] == "classifier")]
    assert len(classifier) == 3 * 2  # 3 seeds x 2 rounds
    first = row(classifier, seed=2, round=1)
    assert first["test-loss"] == pytest.approx(3.5)  # loss + 0.5 in round 1 of seed 2
    assert first["test-macro-f1"] == pytest.approx(0.7 - 0.1)
    assert first["train-loss"] == pytest.approx(3.6)
    cells = tables.rounds_cells
    curve = row(cells, cell=CELL, phase="classifier", round=2)
    assert curve["n"] == 3 and curve["test-loss-mean"] == pytest.approx(2.0)
    cvae = row(cells, cell=CELL, phase="cvae", round=1)
    assert cvae["val-loss-mean"] == pytest.approx(190.0)
    assert math.isnan(cvae["test-loss-mean"])  # not a cvae metric


def test_client_table_keeps_label_counts_before_and_after(tmp_path):
    imputation_sweep(tmp_path)
    clients = write_tables(tmp_path).clients_runs
    assert len(clients) == 18 * 3
    one = row(
        clients,
        cell="dirichlet-beta=0.1__imputation=minority__num-synthetic=100",
        seed=0,
        **{"partition-id": 2},
    )
    before = [one[f"before-{label}"] for label in range(10)]
    after = [one[f"after-{label}"] for label in range(10)]
    assert before == BEFORE
    assert after[0] == BEFORE[0]  # the majority label gets nothing
    assert sum(after) - sum(before) == one["synthetic-train"] == 100


def test_missing_and_failed_runs_are_left_out_and_listed_in_status(tmp_path):
    spec = imputation_sweep(tmp_path)
    missing, failed = spec.runs()[0], spec.runs()[1]
    (run_dir(tmp_path, missing) / SUMMARY).unlink()
    (run_dir(tmp_path, failed) / SUMMARY).unlink()
    write_failure(run_dir(tmp_path, failed), "PhaseError: boom")
    tables = write_tables(tmp_path)
    assert len(tables.final_runs) == 16
    cell = row(tables.final_cells, cell=CELL)
    assert cell["n"] == 1 and cell["test-macro-f1-mean"] == pytest.approx(0.7)
    assert math.isnan(cell["test-macro-f1-std"])  # one seed: no spread to report
    status = tables.status.set_index(["cell", "seed"])
    assert status.loc[(CELL, 0), "status"] == "pending"  # an empty folder
    assert status.loc[(CELL, 1), "status"] == "failed"
    assert status.loc[(CELL, 1), "error"] == "PhaseError: boom"
    assert (status["status"] == "complete").sum() == 16


def test_pretraining_numbers_of_the_finetune_contract(tmp_path):
    finetune_sweep(tmp_path)
    tables = write_tables(tmp_path)
    runs = tables.final_runs
    vanilla = row(runs, cell="dirichlet-beta=0.1__pretrain=off", seed=0)
    assert math.isnan(vanilla["pretrained-test-macro-f1"])
    tuned = row(runs, cell="dirichlet-beta=0.1__pretrain=federated", seed=1)
    assert tuned["test-macro-f1"] == pytest.approx(0.8)
    assert tuned["pretrained-test-macro-f1"] == pytest.approx(0.3)
    assert tuned["pretrain-train-loss"] == pytest.approx(0.02)  # last epoch: 0.02 * (3 - 2)
    assert tuned["pretrain-real-test-loss"] == pytest.approx(2.5)
    assert tuned["pretrain-synthetic-test-loss"] == pytest.approx(0.04)
    epochs = tables.rounds_runs[tables.rounds_runs["phase"] == "pretraining"]
    assert sorted(epochs["round"].unique()) == [1, 2]


def test_every_metric_reaches_every_table(tmp_path):
    imputation_sweep(tmp_path)
    tables = write_tables(tmp_path)
    for name in METRIC_NAMES:
        for column in (f"test-{name}", f"test-{name}-weighted", f"global-test-{name}"):
            assert column in tables.final_runs, column
            assert {f"{column}-mean", f"{column}-std"} <= set(tables.final_cells.columns)
            assert column in tables.rounds_runs and f"{column}-mean" in tables.rounds_cells
        assert f"test-{name}" in tables.clients_runs
    run = row(tables.final_runs, cell=CELL, seed=1)  # client macro-F1 0.6
    assert run["test-micro-f1"] == pytest.approx(0.7)
    assert run["test-macro-f1-present"] == pytest.approx(0.62)
    assert run["test-macro-f1-all-weighted"] == pytest.approx(0.59)
    assert run["global-test-micro-f1"] == pytest.approx(0.75)  # global macro-F1 0.65
    assert run["global-test-accuracy"] == pytest.approx(0.75)
    client = row(tables.clients_runs, cell=CELL, seed=1, **{"partition-id": 0})
    assert client["test-macro-f1-all"] == pytest.approx(0.58)


def test_generator_quality_columns(tmp_path):
    imputation_sweep(tmp_path)
    tables = write_tables(tmp_path)
    cell = "dirichlet-beta=0.1__imputation=minority__num-synthetic=100"
    run = row(tables.final_runs, cell=cell, seed=0)  # fixture macro-F1 0.6
    expected = {
        "quality-synthetic-accuracy": 0.5,
        "quality-synthetic-macro-f1": 0.4,
        "quality-real-accuracy": 0.7,
        "quality-real-macro-f1": 0.6,
        "quality-gap-accuracy": 0.2,
        "quality-gap-macro-f1": 0.2,
        "quality-frechet-distance": 6.0,
        "quality-coverage": 0.3,
    }
    for column, value in expected.items():
        assert run[column] == pytest.approx(value), column
    means = row(tables.final_cells, cell=cell)
    assert means["quality-frechet-distance-mean"] == pytest.approx(7.0)  # 6, 7, 8
    assert math.isnan(row(tables.final_runs, cell=CELL, seed=0)["quality-coverage"])  # no CVAE


def test_an_older_summary_with_pretraining_gives_no_quality_columns():
    # before the check had its reference, generator-quality held the pretrained model's scores
    summary = fake_summary(
        {"imputation": "none", "num-synthetic": 0, "pretrain": "federated"},
        f1=0.7,
        loss=0.8,
        pretraining=fake_pretraining(0.01, 1.5, 0.3),
    )
    assert final_row(summary)["quality-frechet-distance"] == pytest.approx(7.0)
    del summary["generator-quality"]["reference"]
    assert not any(column.startswith("quality-") for column in final_row(summary))


def test_study_preset_is_an_identity_column(tmp_path):
    finetune_sweep(tmp_path)
    tables = write_tables(tmp_path)
    columns = ["cell", "dirichlet-beta", "pretrain", "dataset", "imputation", "num-synthetic"]
    columns.append("clf-strategy")
    assert list(tables.final_runs.columns[:9]) == [*columns, "study-preset", "seed"]
    assert list(tables.final_cells.columns[:9]) == [*columns, "study-preset", "n"]
    assert set(tables.final_runs["study-preset"]) == {"as-written"}
    assert "study-preset" in tables.rounds_runs and "study-preset" in tables.clients_runs
    assert (row(tables.final_cells, cell="dirichlet-beta=0.1__pretrain=off")["n"]) == 2
    # older summaries have no preset: no column
    imputation_sweep(tmp_path / "older")
    assert "study-preset" not in write_tables(tmp_path / "older").final_runs


def test_a_folder_without_sweep_yaml_is_refused(tmp_path):
    with pytest.raises(SweepError, match="not a sweep folder"):
        write_tables(tmp_path)


def test_aggregate_command(tmp_path, capsys):
    imputation_sweep(tmp_path)
    assert cli.main(["aggregate", str(tmp_path)]) == 0
    assert "18 complete runs in 6 cells" in capsys.readouterr().out
    assert (tmp_path / TABLES_DIR / "final_cells.csv").is_file()
    assert cli.main(["aggregate", str(tmp_path / "nowhere")]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_last_rounds_columns_average_the_last_three_classifier_rounds():
    summary = fake_summary(
        {"imputation": "none", "num-synthetic": 0}, f1=0.5, loss=1.0, round_losses=[4, 3, 2, 1]
    )
    rounds = summary["classifier"]["rounds"]
    for entry, accuracy in zip(rounds, [0.1, 0.2, 0.4, 0.9], strict=True):
        entry["global-test"]["accuracy"] = accuracy
    row = final_row(summary)
    assert row["global-test-accuracy-last3"] == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3
    # the clients' macro-F1 per round: the fixture's f1 - 0.1 * (rounds still to go)
    assert row["test-macro-f1-last3"] == pytest.approx(0.5 - 0.1)  # 0.3, 0.4, 0.5
    del rounds[0:2]  # two rounds are not three
    assert "global-test-accuracy-last3" not in final_row(summary)


def test_a_summary_from_before_clf_strategy_stays_in_its_cell(tmp_path):
    """Runs published before the key existed ran FedAvg: their cell is not split in two
    (one row of the older seeds, one of the newer) in final_cells or rounds_cells."""
    spec = imputation_sweep(tmp_path)
    for run in spec.runs():
        if run.cell.name == CELL and run.seed == 0:
            path = run_dir(tmp_path, run) / SUMMARY
            summary = json.loads(path.read_text())
            del summary["config"]["clf-strategy"]
            write_json(path, summary)
    tables = write_tables(tmp_path)
    assert row(tables.final_runs, cell=CELL, seed=0)["clf-strategy"] == "fedavg"
    assert len(tables.final_cells) == 6
    cell = row(tables.final_cells, cell=CELL)
    assert cell["n"] == 3 and cell["test-macro-f1-mean"] == pytest.approx(0.6)
    assert row(tables.rounds_cells, cell=CELL, phase="classifier", round=2)["n"] == 3
