"""Each figure from fixture tables: a non-empty PNG; Table 1 in Markdown; plot command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedaug_flwr.experiments import __main__ as cli
from fedaug_flwr.experiments import aggregate, claims, figures, generators, strategies, tradeoff
from fedaug_flwr.experiments.aggregate import write_tables
from fedaug_flwr.experiments.grid import parse_spec
from fedaug_flwr.experiments.runner import run_dir, write_spec
from fedaug_flwr.results import SUMMARY, write_json
from tests.sweep_fixtures import (
    fake_summary,
    finetune_sweep,
    imputation_sweep,
    privacy_sweep,
    strategies_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{path}: {len(data)} bytes"


@pytest.fixture
def imputation_tables(tmp_path):
    imputation_sweep(tmp_path / "sweep")
    return write_tables(tmp_path / "sweep")


@pytest.fixture
def finetune_tables(tmp_path):
    finetune_sweep(tmp_path / "finetune")
    return write_tables(tmp_path / "finetune")


def test_baseline_runs_are_the_k0_point_of_each_mode(imputation_tables):
    curve = figures.imputation_curve(imputation_tables.final_cells, "uniform")
    assert sorted(set(curve["imputation"])) == ["none", "uniform"]
    assert sorted(set(curve["num-synthetic"])) == [0, 100]
    assert len(curve) == 4  # 2 betas x (baseline, k=100)


def test_label_distributions_per_beta(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 60)
    rng.shuffle(labels)
    path = figures.plot_label_distributions(
        labels, [0.1, 10.0], num_clients=5, seed=0, min_partition_size=10, path=tmp_path / "l.png"
    )
    assert_png(path)


def test_published_runs_draw_label_distributions_from_this_machines_data(tmp_path, monkeypatch):
    """Published summaries name no data folder: the figure reads the data set where a run
    on this machine would ($FEDAUG_DATA_DIR for MNIST) and says so when it is not there."""
    from tests.test_data import write_mnist_folder

    spec = imputation_sweep(tmp_path / "sweep")
    for run in spec.runs():
        path = run_dir(tmp_path / "sweep", run) / SUMMARY
        summary = json.loads(path.read_text())
        summary["data"].update(source="mnist", location="(local folder, not published)")
        path.write_text(json.dumps(summary))
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    drawn = figures.draw_all(tmp_path / "sweep")
    assert "set $FEDAUG_DATA_DIR" in drawn.skipped["label_distributions"]
    write_mnist_folder(tmp_path / "mnist", n_train=600)
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(tmp_path / "mnist"))
    drawn = figures.draw_all(tmp_path / "sweep")
    assert "label_distributions" not in drawn.skipped
    assert_png(tmp_path / "sweep" / "figures" / "label_distributions.png")


def test_imputation_example(imputation_tables, tmp_path):
    assert_png(
        figures.plot_imputation_example(imputation_tables.clients_runs, tmp_path / "i.png", 0.1)
    )
    with pytest.raises(figures.FigureError, match="no minority runs"):
        figures.plot_imputation_example(imputation_tables.clients_runs, tmp_path / "x.png", 0.3)


def test_test_loss_per_round(imputation_tables, tmp_path):
    assert_png(figures.plot_per_round(imputation_tables.rounds_cells, tmp_path / "t.png"))


def test_global_accuracy_per_round(imputation_tables, tmp_path):
    path = figures.plot_per_round(
        imputation_tables.rounds_cells, tmp_path / "g.png", metric="global-test-accuracy"
    )
    assert_png(path)
    without = imputation_tables.rounds_cells.drop(columns=["global-test-accuracy-mean"])
    with pytest.raises(figures.FigureError, match="global-test-accuracy-mean"):
        figures.plot_per_round(without, tmp_path / "x.png", metric="global-test-accuracy")


def test_generator_quality_counts_each_cvae_once(imputation_tables, tmp_path):
    final_runs = imputation_tables.final_runs
    per_cvae, keys = generators.cvae_quality(final_runs)
    assert {"dirichlet-beta", "seed"} <= set(keys)
    assert not {"imputation", "num-synthetic", "cell"} & set(keys)
    # 2 betas x 3 seeds; the uniform and minority runs (k = 100) of a seed share its
    # CVAE, the runs without synthetic images checked none
    assert len(per_cvae) == 6 and set(per_cvae["runs"]) == {2}
    lines = generators.generator_quality_markdown(final_runs).splitlines()
    beta_01 = [line for line in lines if line.startswith("| 0.1 |")]
    # seed 0: the fixture's checks give uniform 0.45 and minority 0.50 (its f1 - 0.1)
    assert beta_01[0].startswith("| 0.1 | 0 | 2 | 0.450 to 0.500 | 0.650 to 0.700 | 0.200 |")
    # over seeds: the CVAEs' means 0.475, 0.575, 0.675
    assert beta_01[3].startswith("| 0.1 | 3 | 0.575 +- 0.100 | 0.775 +- 0.100 |")
    assert_png(
        figures.save_figure(generators.plot_generator_quality(final_runs), tmp_path / "q.png")
    )
    # the classifier's strategy and its keys do not change the CVAE either
    strategies_sweep(tmp_path / "strategies")
    by_strategy = write_tables(tmp_path / "strategies").final_runs
    per_cvae, keys = generators.cvae_quality(by_strategy)
    assert not {"clf-strategy", "proximal-mu"} & set(keys)
    assert len(per_cvae) == 3 and set(per_cvae["runs"]) == {2}  # a seed: FedAvg's, FedProx's
    unchecked = final_runs.drop(columns=[c for c in final_runs if c.startswith("quality-")])
    with pytest.raises(figures.FigureError, match="no run checked a CVAE"):
        generators.cvae_quality(unchecked)


def test_generator_quality_keeps_apart_the_classifier_keys_the_check_trains_with(tmp_path):
    """The check trains its classifiers with clf-lr, clf-weight-decay and clf-batch-size:
    runs that differ in one share a CVAE, but not the check's numbers."""
    spec = parse_spec(
        {
            "name": "fixture-batch",
            "federation": {"num-supernodes": 3},
            "base": {"imputation": "uniform", "num-synthetic": 100},
            "axes": {"clf-batch-size": [32, 10]},
            "seeds": [0, 1],
        }
    )
    write_spec(tmp_path, spec)
    for run in spec.runs():
        f1 = 0.6 + run.seed / 10 + (0.1 if run.cell.as_dict()["clf-batch-size"] == 10 else 0.0)
        write_json(run_dir(tmp_path, run) / SUMMARY, fake_summary(run.run_config, f1, loss=1.0))
    final_runs = write_tables(tmp_path).final_runs
    per_cvae, keys = generators.cvae_quality(final_runs)
    assert "clf-batch-size" in keys
    assert len(per_cvae) == 4 and set(per_cvae["runs"]) == {1}  # no range of two checks
    for key in ("clf-lr", "clf-weight-decay", "clf-batch-size"):
        assert generators.trains_the_cvae(key), key
    assert not generators.trains_the_cvae("clf-rounds")


@pytest.mark.parametrize("mode", ["uniform", "minority"])
def test_macro_f1_against_k(imputation_tables, tmp_path, mode):
    assert_png(figures.plot_macro_f1_vs_k(imputation_tables.final_cells, tmp_path / "f.png", mode))


def test_average_over_beta_is_taken_per_seed_then_over_seeds(imputation_tables, tmp_path):
    table = figures.averaged_over_beta(imputation_tables.final_runs)
    minority = table[(table["imputation"] == "minority") & (table["num-synthetic"] == 100)].iloc[0]
    # seed s: mean of beta 0.1 (0.6, 0.7, 0.8) and beta 10 (0.9) -> 0.75, 0.8, 0.85
    assert minority["mean"] == pytest.approx(0.8)
    assert minority["std"] == pytest.approx(0.05)
    assert minority["n"] == 3
    baseline = table[(table["imputation"] == "uniform") & (table["num-synthetic"] == 0)].iloc[0]
    assert baseline["mean"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2
    path = figures.plot_macro_f1_vs_k_averaged(imputation_tables.final_runs, tmp_path / "a.png")
    assert_png(path)


def test_finetune_comparison(finetune_tables, tmp_path):
    table = figures.finetune_comparison(finetune_tables.final_cells)
    at_01 = table[np.isclose(table["dirichlet-beta"], 0.1)].set_index("model")
    assert at_01.loc["vanilla", "mean"] == pytest.approx(0.65)
    assert at_01.loc["finetuned", "mean"] == pytest.approx(0.75)
    assert at_01.loc["pretrained", "mean"] == pytest.approx(0.3)
    assert at_01.loc["finetuned", "n"] == 2
    assert_png(figures.plot_finetune_comparison(finetune_tables.final_cells, tmp_path / "c.png"))


def test_finetune_comparison_refuses_two_cells_of_one_model(finetune_tables):
    """Two vanilla cells at a beta: the figure would show the first one's numbers alone."""
    cells = finetune_tables.final_cells
    other = cells[cells["pretrain"] == "off"].copy()
    other["cell"] = other["cell"] + "__clf-strategy=fedprox"
    with pytest.raises(figures.FigureError, match="2 cells"):
        figures.finetune_comparison(pd.concat([cells, other], ignore_index=True))


def test_finetune_figure_needs_pretraining_runs(imputation_tables, tmp_path):
    with pytest.raises(figures.FigureError, match="runs with pretraining"):
        figures.plot_finetune_comparison(imputation_tables.final_cells, tmp_path / "c.png")


def test_cells_table_gives_each_cells_mean_and_std_over_seeds(imputation_tables):
    text = figures.cells_markdown(imputation_tables.final_cells)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    # beta 0.1, no synthetic images: client macro-F1 0.5, 0.6, 0.7 over the 3 seeds; the
    # fixture's global accuracy is that + 0.15
    baseline = rows["dirichlet-beta=0.1__imputation=none__num-synthetic=0"]
    assert baseline.startswith(
        "| dirichlet-beta=0.1__imputation=none__num-synthetic=0 | 3 | 0.600 +- 0.100 |"
    )
    assert "| 0.750 +- 0.100 |" in baseline
    assert len([line for line in text.splitlines() if line.startswith("| dirichlet")]) == 6
    with pytest.raises(figures.FigureError, match="no complete runs"):
        figures.cells_markdown(imputation_tables.final_cells.iloc[:0])


def test_runs_table_gives_each_runs_metric_after_every_classifier_round(imputation_tables):
    rounds_runs = imputation_tables.rounds_runs
    text = figures.runs_markdown(rounds_runs)
    lines = text.splitlines()
    assert lines[2] == "| cell | seed | 1 | 2 |"  # the fixture's runs have 2 rounds
    classifier = rounds_runs[rounds_runs["phase"] == "classifier"]
    first = classifier.iloc[0]
    run = classifier[(classifier["cell"] == first["cell"]) & (classifier["seed"] == first["seed"])]
    accuracy = run.set_index("round")["global-test-accuracy"]
    assert (
        f"| {first['cell']} | {int(first['seed'])} | {accuracy[1]:.3f} | {accuracy[2]:.3f} |"
        in lines
    )
    assert len([line for line in lines if line.startswith("| dirichlet")]) == len(
        classifier.groupby(["cell", "seed"])
    )
    # a run that stopped after round 1 has no round 2
    shorter = rounds_runs.drop(run.index[run["round"] == 2])
    assert f"| {first['cell']} | {int(first['seed'])} | {accuracy[1]:.3f} | - |" in (
        figures.runs_markdown(shorter)
    )
    with pytest.raises(figures.FigureError, match="no classifier round"):
        figures.runs_markdown(rounds_runs[rounds_runs["phase"] == "cvae"])


def test_table1_markdown(finetune_tables):
    text = figures.table1_markdown(finetune_tables.final_runs)
    lines = text.strip().splitlines()
    assert lines[0] == (
        "| beta | train loss (synthetic) | test loss (synthetic) | test loss (real) | n |"
    )
    # seeds 0, 1: train loss 0.01, 0.02; real test loss 1.5, 2.5
    assert lines[2] == ("| 0.1 | 0.0150 +- 0.0071 | 0.0300 +- 0.0141 | 2.0000 +- 0.7071 | 2 |")
    assert len(lines) == 2 + 2  # header, rule, two betas
    # one seed has no std: its mean alone, not "+- nan"
    single = figures.table1_markdown(finetune_tables.final_runs.query("seed == 0"))
    assert single.splitlines()[2] == "| 0.1 | 0.0100 | 0.0200 | 1.5000 | 1 |"


def test_plot_command_draws_everything_a_sweep_supports(tmp_path, capsys):
    imputation_sweep(tmp_path / "sweep")
    finetune_sweep(tmp_path / "finetune")
    for name, expected, skipped in (
        (
            "sweep",
            {
                "label_distributions.png",
                "imputation_example.png",
                "test_loss_per_round.png",
                "global_accuracy_per_round.png",
                "generator_quality.md",
                "generator_quality.png",
                "cells.md",
                "runs.md",
                "macro_f1_vs_k_uniform.png",
                "macro_f1_vs_k_minority.png",
                "macro_f1_vs_k_averaged.png",
                "global_accuracy_vs_k_uniform.png",
                "global_accuracy_vs_k_minority.png",
                "global_accuracy_vs_k_averaged.png",
                "claims.md",
                "claims_imputation.png",
                "claims_test_loss.png",
            },
            [
                "claims_finetuning",
                "finetune_comparison",
                "finetune_comparison_global",
                "table1",
                "privacy_tradeoff",
                "strategy_comparison",
                "progress",  # not a campaign: no stages
            ],
        ),
        (
            "finetune",
            {
                "label_distributions.png",
                "finetune_comparison.png",
                "finetune_comparison_global.png",
                "table1.md",
                "claims.md",
                "claims_finetuning.png",
                "cells.md",
                "runs.md",
                "generator_quality.md",
                "generator_quality.png",
            },
            [
                "macro_f1_vs_k_uniform",
                "global_accuracy_vs_k_uniform",
                "global_accuracy_per_round",
                "claims_imputation",
                "claims_test_loss",
                "progress",
            ],
        ),
    ):
        assert cli.main(["plot", str(tmp_path / name)]) == 0
        stdout = capsys.readouterr().out
        written = {p.name for p in (tmp_path / name / "figures").iterdir()}
        assert written == expected
        for png in {p for p in written if p.endswith(".png")}:
            assert_png(tmp_path / name / "figures" / png)
        for figure in skipped:
            assert f"skipped {figure}:" in stdout
        if name == "sweep":  # a skipped forest plot says why its claims cannot be computed
            assert "skipped claims_finetuning: finetune claims need column(s)" in stdout
        else:
            assert "skipped claims_imputation: imputation claims need" in stdout
            # each k figure names the metric it draws
            assert "skipped global_accuracy_vs_k_uniform: global-test-accuracy vs k: no runs" in (
                stdout
            )
        assert (tmp_path / name / "tables" / "final_cells.csv").is_file()


def test_claims_are_paired_by_seed_then_summarized_over_seeds(imputation_tables):
    table = claims.imputation_claims(imputation_tables.final_runs).set_index("comparison")
    overall = table.loc["minority - uniform, mean over betas and k > 0"]
    # per seed: minority (0.75, 0.8, 0.85) - uniform (0.685, 0.745, 0.805)
    assert overall["mean"] == pytest.approx(0.055)
    assert overall["std"] == pytest.approx(0.01)
    assert overall["n"] == 3 and overall["betas"] == "0.1, 10"
    gain = table[table["betas"] == "10"].loc["minority k = 100 (50%) - no synthetic"]
    assert gain["mean"] == pytest.approx(0.1) and gain["std"] == pytest.approx(0.0)
    both = table[table["betas"] == "0.1, 10"].loc["uniform k = 100 (50%) - no synthetic"]
    assert both["mean"] == pytest.approx(0.045)  # ((0.65 - 0.6) + (0.84 - 0.8)) / 2 per seed
    # 95 % interval: 0.055 +- t(0.975, 2) * 0.01 / sqrt(3) = 0.055 +- 4.3027 * 0.005774
    assert overall["ci-low"] == pytest.approx(0.030158, abs=1e-5)
    assert overall["ci-high"] == pytest.approx(0.079842, abs=1e-5)
    assert overall["verdict"] == "agrees"
    # the paired t test: t = 0.055 / (0.01 / sqrt(3)), two-sided with 2 degrees of freedom,
    # p = 1 - t / sqrt(t^2 + 2); q adjusts it over every comparison of the table
    t = 0.055 / (0.01 / np.sqrt(3))
    assert overall["p"] == pytest.approx(1 - t / np.sqrt(t**2 + 2))
    assert overall["q"] >= overall["p"]
    assert table["q"].to_list() == pytest.approx(
        claims.false_discovery_q(table["p"]).to_list(), nan_ok=True
    )
    text = claims.claims_markdown(table.reset_index(), "test-macro-f1")
    assert (
        "| minority - uniform, mean over betas and k > 0 | 0.1, 10 | +0.0550 | 0.0100 | 3 "
        f"| [+0.0302, +0.0798] | {overall['q']:.3f} | + |  |  | agrees |" in text
    )


def test_claims_cite_the_study_number_only_on_the_metric_the_study_measured(imputation_tables):
    """The study's +0.015 (minority - uniform) is global accuracy: shown on that table only."""
    on_clients = claims.imputation_claims(imputation_tables.final_runs).set_index("comparison")
    assert on_clients["study-number"].isna().all()
    on_figure = claims.imputation_claims(
        imputation_tables.final_runs, claims.IMPUTATION_FIGURE_METRIC
    ).set_index(["comparison", "betas"])
    # the study's +0.015 is the mean over its 5 betas and k = 100, 500, 1000: not a number
    # for this grid's mean over betas 0.1, 10 and k = 100, nor for any other comparison of it
    assert on_figure["study-number"].isna().all()
    grid = claims.imputation_claims(
        study_grid(imputation_tables.final_runs), claims.IMPUTATION_FIGURE_METRIC
    ).set_index(["comparison", "betas"])
    overall = grid.loc[("minority - uniform, mean over betas and k > 0", "0.1, 0.3, 0.5, 10, 100")]
    assert overall["study-number"] == pytest.approx(0.015)
    assert "section 5" in overall["study-source"]
    text = claims.claims_markdown(grid.reset_index(), claims.IMPUTATION_FIGURE_METRIC)
    # the interval [+0.0302, +0.0798] (the fixture's accuracies are its macro-F1 plus a constant)
    # leaves out the study's +0.015
    assert "| + | +0.0150 (paper, section 5: 5 betas, k = 100, 500, 1000) | no | agrees |" in text
    # the five betas but k = 100 only: not the study's average either
    spread = study_grid(imputation_tables.final_runs)
    k100 = claims.imputation_claims(
        spread[spread["num-synthetic"] <= 100], claims.IMPUTATION_FIGURE_METRIC
    )
    assert k100["study-number"].isna().all()
    # k = 100, 500, 1000 but betas 0.1 and 100 only (a campaign's first stage): neither
    two_betas = spread[
        np.isclose(spread["dirichlet-beta"], 0.1) | (spread["dirichlet-beta"] == 100)
    ]
    first = claims.imputation_claims(two_betas, claims.IMPUTATION_FIGURE_METRIC)
    numbers = first.set_index(["comparison", "betas"])["study-number"].dropna()
    # only the study's own single-beta number is left: minority k = 1000 at beta 100
    assert list(numbers.index) == [("minority k = 1000 (50%) - no synthetic", "100")]


def test_minority_beats_uniform_at_every_k_but_100_is_a_claim_with_a_verdict(imputation_tables):
    """The study: minority beat uniform at every k except 100 (docs/study.md)."""
    grid = claims.imputation_claims(study_grid(imputation_tables.final_runs))
    per_k = grid[grid["comparison"].str.startswith("minority - uniform at k = ")]
    per_k = per_k.set_index("comparison")
    for k in (500, 1000):
        row = per_k.loc[f"minority - uniform at k = {k} (50% synthetic)"]
        assert (row["study"], row["verdict"]) == ("+", "agrees")
    at_100 = per_k.loc["minority - uniform at k = 100 (50% synthetic)"]
    assert (at_100["study"], at_100["verdict"]) == ("", "")  # no direction stated


def study_grid(final_runs: pd.DataFrame) -> pd.DataFrame:
    """The fixture's runs spread over the study's grid: betas 0.1, 0.3, 0.5 are copies of
    the fixture's beta 0.1, 10 and 100 of its beta 10; k = 500 and 1000 of its k = 100."""
    copies = []
    for beta, source in ((0.1, 0.1), (0.3, 0.1), (0.5, 0.1), (10.0, 10.0), (100.0, 10.0)):
        for k, source_k in ((0, 0), (100, 100), (500, 100), (1000, 100)):
            rows = final_runs[
                np.isclose(final_runs["dirichlet-beta"], source)
                & (final_runs["num-synthetic"] == source_k)
            ].copy()
            rows["dirichlet-beta"], rows["num-synthetic"] = beta, k
            rows["cell"] = rows["cell"] + f"@{beta:g},{k}"
            copies.append(rows)
    return pd.concat(copies, ignore_index=True)


def test_finetune_claims_and_levels_set_the_study_numbers_beside_ours(tmp_path):
    finetune_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    glob = claims.finetune_claims(final_runs, claims.FINETUNE_FIGURE_METRIC)
    tuned = glob[glob["comparison"] == "fine-tuned - vanilla"].set_index("betas")
    # the authors' saved outputs: fine-tuned 0.88934 - vanilla 0.86666 at beta 0.1
    assert tuned.loc["0.1", "study-number"] == pytest.approx(0.02268)
    assert tuned.loc["100", "study-number"] == pytest.approx(0.95124 - 0.96634)
    assert glob[glob["comparison"] == "pretrained only - vanilla"]["study-number"].isna().all()
    on_clients = claims.finetune_claims(final_runs)
    assert on_clients["study-number"].isna().all()

    levels = claims.study_levels(final_runs).set_index(["model", "beta"])
    vanilla = levels.loc[("vanilla FedAvg (k = 0)", 0.1)]
    # global macro-F1 of the fixture's vanilla runs: 0.65, 0.75
    assert vanilla["study"] == pytest.approx(0.86666)
    assert (vanilla["mean"], vanilla["n"]) == (pytest.approx(0.70), 2)
    assert levels.loc[("fine-tuned", 100.0), "mean"] == pytest.approx(0.80)
    assert len(levels) == 4  # two models x betas 0.1, 100: none of 0.3, 0.5, 10
    report = claims.claims_report(final_runs)
    assert "## The study's levels: global-test-macro-f1" in report
    # 0.70 +- t(0.975, 1) * 0.0707 / sqrt(2) = 0.70 +- 12.706 * 0.05
    assert (
        "| vanilla FedAvg (k = 0) | 0.1 | 0.8667 | 0.7000 | 0.0707 | 2 | [0.0647, 1.3353] "
        "| -0.1667 | yes |" in report
    )


def test_finetune_claims_pair_vanilla_and_pretraining_by_seed(tmp_path):
    finetune_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    table = claims.finetune_claims(final_runs).set_index(["comparison", "betas"])
    # fine-tuned 0.7, 0.8 against vanilla 0.6, 0.7: +0.1 in both seeds
    tuned = table.loc[("fine-tuned - vanilla", "0.1")]
    assert tuned["mean"] == pytest.approx(0.1) and tuned["verdict"] == "agrees"
    assert table.loc[("fine-tuned - vanilla", "100")]["verdict"] == "differs"  # study: none
    # the legend says what each verdict means, "differs" too
    legend = claims.claims_report(final_runs).split("\n\n")[0]
    assert "differs" in legend and "otherwise inconclusive" in legend
    # pretrained 0.3 against 0.6, 0.7: -0.3, -0.4; std 0.0707, t(0.975, 1) = 12.706
    pretrained = table.loc[("pretrained only - vanilla", "0.1")]
    assert pretrained["mean"] == pytest.approx(-0.35)
    assert pretrained["ci-low"] == pytest.approx(-0.35 - 12.7062 * 0.05, abs=1e-4)
    assert pretrained["verdict"] == "inconclusive"
    glob = claims.finetune_claims(final_runs, "global-test-macro-f1").set_index("comparison")
    # global: pretrained 0.35 against vanilla 0.65, 0.75 (both +0.05 over the clients)
    assert glob.loc["pretrained only - vanilla"].iloc[0]["mean"] == pytest.approx(-0.35)


def test_finetune_claims_refuse_two_cells_of_one_arm(tmp_path):
    """Two vanilla cells at a beta (e.g. another clf-strategy): pairing each fine-tuned run
    with both would count 2 seeds as 4 pairs and mix the cells."""
    finetune_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    other = final_runs[final_runs["pretrain"] == "off"].copy()
    other["cell"], other["clf-strategy"] = other["cell"] + "__clf-strategy=fedprox", "fedprox"
    both = pd.concat([final_runs, other], ignore_index=True)
    with pytest.raises(claims.FigureError, match="2 cells"):
        claims.finetune_claims(both)
    with pytest.raises(claims.FigureError, match="2 cells"):
        claims.study_levels(both)  # nor a level of the two cells' runs together


def test_verdicts_follow_the_interval():
    assert claims.verdict(0.01, 0.05, +1) == "agrees"
    assert claims.verdict(0.01, 0.05, -1) == "disagrees"
    assert claims.verdict(-0.01, 0.05, +1) == "inconclusive"
    # an interval that covers zero does not show that there is no difference either
    assert claims.verdict(-0.01, 0.05, 0) == "inconclusive"
    assert claims.verdict(0.01, 0.05, 0) == "differs"
    assert claims.verdict(float("nan"), float("nan"), +1) == "inconclusive (n < 2)"
    # two differences 0.1 and 0.3: mean 0.2, std 0.1414, t(0.975, 1) = 12.706
    low, high = claims.interval([0.1, 0.3])
    assert (low, high) == (pytest.approx(0.2 - 12.7062 * 0.1), pytest.approx(0.2 + 12.7062 * 0.1))


def test_p_values_follow_the_interval_and_q_values_adjust_them_for_their_number():
    # two differences 0.1 and 0.3: t = 0.2 / (0.1414 / sqrt(2)) = 2, 1 degree of freedom:
    # p = 1 - 2 * atan(2) / pi
    assert claims.p_value([0.1, 0.3]) == pytest.approx(1 - 2 * np.arctan(2) / np.pi)
    assert np.isnan(claims.p_value([0.1]))
    assert claims.p_value([0.02, 0.02]) == 0.0 and claims.p_value([0.0, 0.0]) == 1.0
    # p < 0.05 exactly where the 95 % interval excludes zero
    for values in ([0.1, 0.3], [0.05, 0.055, 0.06], [-0.02, 0.01, 0.03], [-0.2, -0.21]):
        low, high = claims.interval(values)
        assert (claims.p_value(values) < 0.05) == (low > 0 or high < 0)
    # Benjamini-Hochberg by hand over the 3 finite p values 0.01, 0.03, 0.04:
    # p * m / rank = 0.03, 0.045, 0.04, each then the least of itself and those above it
    q = claims.false_discovery_q(pd.Series([0.01, 0.04, np.nan, 0.03]))
    assert q.to_list() == pytest.approx([0.03, 0.04, np.nan, 0.04], nan_ok=True)
    assert claims.q_text(0.0004) == "< 0.001" and claims.q_text(np.nan) == "-"


def test_the_declared_scipy_has_the_false_discovery_control_that_q_values_use():
    """scipy.stats.false_discovery_control came with scipy 1.11: an older scipy that the
    project's dependencies admit would fail at the first claims table."""
    import re
    import tomllib

    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    (scipy,) = [d for d in dependencies if re.match(r"scipy\b", d)]
    lowest = tuple(int(n) for n in re.search(r">=\s*([\d.]+)", scipy).group(1).split("."))
    assert lowest >= (1, 11), scipy


def test_claims_forest_plot_draws_each_interval_in_the_colour_of_what_it_supports(
    imputation_tables,
):
    from matplotlib.colors import to_rgba

    table = claims.imputation_claims(imputation_tables.final_runs)
    figure = claims.plot_claims({"test-macro-f1": table, "again": table}, "Imputation")
    axis = figure.axes[0]
    labels = [label.get_text() for label in axis.get_yticklabels()]
    assert labels[0] == "minority - uniform, mean over betas and k > 0, beta 0.1, 10  [study: +]"

    def drawn_at(row: int) -> list:
        return [line for line in axis.get_lines() if list(line.get_ydata()) in ([row], [row, row])]

    # the overall row agrees with the study (interval [+0.030, +0.080]): a green interval
    overall = table.iloc[0]
    interval_line, point = drawn_at(0)
    assert list(interval_line.get_xdata()) == pytest.approx([overall["ci-low"], overall["ci-high"]])
    assert to_rgba(interval_line.get_color()) == to_rgba("tab:green")
    filled = overall["q"] < 0.05
    assert (to_rgba(point.get_markerfacecolor()) == to_rgba("tab:green")) == filled
    # a row whose interval covers zero is grey
    covers = table.index[(table["n"] >= 2) & (table["ci-low"] < 0) & (table["ci-high"] > 0)]
    assert len(covers)
    grey_line, grey_point = drawn_at(int(covers[0]))
    assert to_rgba(grey_line.get_color()) == to_rgba("tab:gray")
    # ... and open: its p value, so its q, is at least 0.05
    assert to_rgba(grey_point.get_markerfacecolor()) == to_rgba("white")
    # a comparison of one seed is a cross, without an interval
    one = claims.imputation_claims(
        imputation_tables.final_runs[imputation_tables.final_runs["seed"] == 0]
    )
    lines = claims.plot_claims({"m": one}, "Imputation").axes[0].get_lines()
    assert {line.get_marker() for line in lines} == {"x", "None"}  # crosses and the zero line
    with pytest.raises(claims.FigureError, match="different rows"):
        claims.plot_claims({"a": table, "b": table.iloc[:3]}, "Imputation")


def test_every_metrics_claims_table_has_the_same_rows_for_the_forest_plots_labels(
    imputation_tables,
):
    """A metric missing at one k (e.g. an older run without it) leaves that k's rows
    empty (n = 0) instead of dropping them: the forest plot labels every panel's rows with
    the first table's, so the rows must be the same comparisons in the same order."""
    final_runs = imputation_tables.final_runs
    more = final_runs[final_runs["num-synthetic"] == 100].copy()
    more["num-synthetic"] = 1000
    more["cell"] = more["cell"].str.replace("100", "1000")
    final_runs = pd.concat([final_runs, more], ignore_index=True)
    final_runs.loc[final_runs["num-synthetic"] == 100, "test-macro-f1"] = np.nan
    final_runs.loc[final_runs["num-synthetic"] == 1000, "global-test-accuracy"] = np.nan
    tables = claims.claim_tables(final_runs)["Imputation"]
    f1, accuracy = tables["test-macro-f1"], tables["global-test-accuracy"]
    keys = ["comparison", "betas"]
    assert f1[keys].equals(accuracy[keys])
    # on accuracy every comparison with k = 1000 (also the mean over every k > 0) is empty
    with_1000 = accuracy["comparison"].str.contains("1000|k > 0")
    assert with_1000.any() and (accuracy.loc[with_1000, "n"] == 0).all()
    assert (accuracy.loc[~with_1000, "n"] == 3).all()
    claims.plot_claims(tables, "Imputation")
    # tables of the same length whose rows differ would be drawn under the wrong labels
    other = f1.assign(comparison=f1["comparison"].str.replace("1000", "500"))
    with pytest.raises(claims.FigureError, match="different rows"):
        claims.plot_claims({"a": f1, "b": other}, "Imputation")


def test_averages_over_beta_count_only_seeds_that_have_every_beta(tmp_path):
    spec = imputation_sweep(tmp_path)
    missing = next(
        r
        for r in spec.runs()
        if r.seed == 2
        and r.cell.name == "dirichlet-beta=10.0__imputation=minority__num-synthetic=100"
    )
    (run_dir(tmp_path, missing) / SUMMARY).unlink()
    final_runs = write_tables(tmp_path).final_runs
    table = figures.averaged_over_beta(final_runs)
    minority = table[(table["imputation"] == "minority") & (table["num-synthetic"] == 100)].iloc[0]
    assert minority["n"] == 2 and minority["mean"] == pytest.approx((0.75 + 0.8) / 2)
    overall = claims.imputation_claims(final_runs).iloc[0]
    assert overall["n"] == 2 and overall["mean"] == pytest.approx(0.06)  # seeds 0, 1 only


def test_claims_compare_the_same_cells_when_a_cell_has_no_runs_yet(tmp_path):
    """A campaign in progress: minority k = 100 at beta 10 has no run in any seed. Averages
    over betas (and over k) must then not set minority's other cells against all of
    uniform's: no seed has every cell, so those comparisons have no values yet."""
    spec = imputation_sweep(tmp_path)
    for run in spec.runs():
        if run.cell.name == "dirichlet-beta=10.0__imputation=minority__num-synthetic=100":
            (run_dir(tmp_path, run) / SUMMARY).unlink()
    table = claims.imputation_claims(write_tables(tmp_path).final_runs)
    by_name = table.set_index(["comparison", "betas"])
    assert by_name.loc[("minority - uniform, mean over betas and k > 0", "0.1, 10"), "n"] == 0
    assert by_name.loc[("minority k = 100 (50%) - no synthetic", "0.1, 10"), "n"] == 0
    assert by_name.loc[("minority k = 100 (50%) - no synthetic", "10"), "n"] == 0
    beta_01 = by_name.loc[("minority k = 100 (50%) - no synthetic", "0.1")]
    assert beta_01["n"] == 3
    assert by_name.loc[("uniform k = 100 (50%) - no synthetic", "0.1, 10"), "n"] == 3
    text = claims.claims_markdown(table, "test-macro-f1")
    assert "nan" not in text
    overall = (
        "| minority - uniform, mean over betas and k > 0 | 0.1, 10 | - | - | 0 | - | - | + |  |"
    )
    assert overall in text


def test_privacy_tradeoff_pairs_each_budget_with_the_no_dp_run_of_its_seed(tmp_path):
    privacy_sweep(tmp_path)
    table = tradeoff.tradeoff_table(write_tables(tmp_path).final_runs).set_index("budget")
    # no DP first, then tighter budgets; the runs without synthetic images last
    assert list(table.index) == ["∞ (no DP)", "8", "1", "no synthetic images"]
    assert table.loc["8", "runs"] == 3 and table.loc["1", "epsilon-spent-max"] == 0.99
    assert table.loc["1", "test-macro-f1-mean"] == pytest.approx(0.5)
    # budget 1 minus no DP per seed: -0.2, -0.25, -0.15; std 0.05, t(0.975, 2) = 4.3027
    tight = table.loc["1"]
    assert tight["test-macro-f1-diff-mean"] == pytest.approx(-0.2)
    half = 4.3027 * 0.05 / np.sqrt(3)
    assert tight["test-macro-f1-diff-low"] == pytest.approx(-0.2 - half, abs=1e-4)
    assert tight["test-macro-f1-diff-high"] == pytest.approx(-0.2 + half, abs=1e-4)
    assert tight["privacy-auc-loss-diff-mean"] == pytest.approx(-0.1)
    # against no synthetic images (0.45, 0.55, 0.75): -0.05, -0.1, -0.1 per seed
    assert tight["test-macro-f1-vs-none-diff-mean"] == pytest.approx(-0.25 / 3)
    assert tight["test-macro-f1-vs-none-diff-high"] == pytest.approx(
        -0.25 / 3 + 4.3027 * 0.028868 / np.sqrt(3), abs=1e-4
    )
    assert table.loc["∞ (no DP)", "test-macro-f1-vs-none-diff-mean"] == pytest.approx(0.35 / 3)
    assert table.loc["no synthetic images", "runs"] == 3
    assert table.loc["no synthetic images", "test-macro-f1-mean"] == pytest.approx(0.5833, 1e-3)
    # q: every difference of the table is one family, 3 compared numbers + the one
    # against no synthetic images at budgets 8 and 1, that one alone at no DP: 9
    p_values = table[[c for c in table if c.endswith("-diff-p")]].stack().dropna()
    assert len(p_values) == 9
    assert tight["test-macro-f1-diff-p"] == pytest.approx(claims.p_value([-0.2, -0.25, -0.15]))
    q = claims.false_discovery_q(p_values)
    assert tight["test-macro-f1-diff-q"] == pytest.approx(q[("1", "test-macro-f1-diff-p")])
    assert table.loc["∞ (no DP)", "test-macro-f1-vs-none-diff-q"] == pytest.approx(
        q[("∞ (no DP)", "test-macro-f1-vs-none-diff-p")]
    )
    text = tradeoff.tradeoff_markdown(write_tables(tmp_path).final_runs)
    tight_q = claims.q_text(tight["test-macro-f1-diff-q"])
    assert f"-0.200 [{-0.2 - half:+.3f}, {-0.2 + half:+.3f}], n=3, q {tight_q}: lower" in text
    # budget 8: -0.02, -0.01, -0.03: the interval [-0.045, +0.005] covers zero
    assert "-0.020 [-0.045, +0.005], n=3, q " in text and ": inconclusive" in text
    assert "| ∞ (no DP) | 3 | – |" in text and "0.050 ± 0.000 (0.050)" in text
    assert "| no synthetic images | 3 | – | – |" in text
    assert "-0.083 [-0.155, -0.012], n=3, q " in text  # budget 1 against none


def test_privacy_tradeoff_is_drawn_for_a_budget_sweep_only(tmp_path, capsys):
    privacy_sweep(tmp_path / "privacy")
    assert cli.main(["plot", str(tmp_path / "privacy")]) == 0
    assert_png(tmp_path / "privacy" / "figures" / "privacy_tradeoff.png")
    # the study's figures would average the three budgets at k = 100: skipped, saying why
    stdout = capsys.readouterr().out
    assert "skipped macro_f1_vs_k_minority: test-macro-f1 vs k: 3 cells at beta=" in stdout
    assert "skipped macro_f1_vs_k_averaged: average over beta: 3 cells" in stdout
    assert ": lower" in (tmp_path / "privacy" / "figures" / "privacy_tradeoff.md").read_text()
    imputation_sweep(tmp_path / "plain")
    with pytest.raises(tradeoff.FigureError, match="needs a sweep over cvae-dp-epsilon"):
        tradeoff.tradeoff_table(write_tables(tmp_path / "plain").final_runs)


def test_privacy_tradeoff_refuses_dp_runs_without_a_budget(tmp_path):
    privacy_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    final_runs.loc[final_runs["cvae-dp-epsilon"] == 8.0, "cvae-dp-epsilon"] = 0.0
    with pytest.raises(tradeoff.FigureError, match="DP but no budget"):
        tradeoff.tradeoff_table(final_runs)


def test_runs_with_pretraining_are_not_the_k0_point_of_the_imputation_curves(tmp_path):
    finetune_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    assert set(final_runs["pretrain"]) == {"off", "federated"}
    for mode in ("uniform", "minority"):
        curve = aggregate.imputation_curve(final_runs, mode)
        assert set(curve["pretrain"]) == {"off"} and len(curve) == 4  # 2 betas x 2 seeds
        aggregate.require_one_cell_per_point(curve, "test")  # one cell per (beta, k) left


def test_strategy_comparison_pairs_by_seed_and_asks_whether_the_fixes_add_up(tmp_path, capsys):
    strategies_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    table = strategies.comparisons(final_runs).set_index("comparison")
    alone = table.loc["fedprox - fedavg, no synthetic"]
    assert alone["mean"] == pytest.approx(0.05) and alone["verdict"] == "higher"
    assert table.loc["fedavg: synthetic - none", "mean"] == pytest.approx(0.1)
    # augmentation against the fix: FedAvg + synthetic (0.6, 0.7, 0.8) - FedProx (0.55, ...)
    against = table.loc["fedavg + synthetic - fedprox, no synthetic"]
    assert against["mean"] == pytest.approx(0.05) and against["n"] == 3
    assert table.loc["fedprox: synthetic - none", "mean"] == pytest.approx(0.08)
    both = table.loc["fedprox + synthetic - fedavg, no synthetic"]
    assert both["mean"] == pytest.approx(0.13) and both["n"] == 3
    # (0.07, 0.09, 0.08) - 0.1 per seed: -0.02 +- 4.3027 * 0.01 / sqrt(3) covers zero
    interaction = table.loc["fedprox: interaction (do they add up?)"]
    assert interaction["mean"] == pytest.approx(-0.02) and interaction["std"] == pytest.approx(0.01)
    assert interaction["ci-high"] == pytest.approx(-0.02 + 4.3027 * 0.01 / np.sqrt(3), abs=1e-4)
    assert interaction["verdict"] == "inconclusive"
    # q: each row's t test adjusted over every comparison of the table
    assert table["q"].to_list() == pytest.approx(
        claims.false_discovery_q(table["p"]).to_list(), nan_ok=True
    )
    assert interaction["p"] == pytest.approx(claims.p_value([-0.03, -0.01, -0.02]))
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert_png(tmp_path / "figures" / "strategy_comparison.png")
    text = (tmp_path / "figures" / "strategy_comparison.md").read_text()
    assert "| fedprox | 0.650 ± 0.100 (3) | 0.730 ± 0.105 (3) |" in text
    assert (
        "| fedprox: interaction (do they add up?) | -0.0200 | 0.0100 | 3 | [-0.0448, +0.0048] "
        f"| {interaction['q']:.3f} | inconclusive |" in text
    )
    # the same comparisons on the global model's test accuracy (the fixture: client F1 + 0.15)
    clients_part, global_part = text.split("## The global model's accuracy")
    assert "| fedprox | 0.650 ± 0.100 (3) |" in clients_part
    assert "| fedprox | 0.800 ± 0.100 (3) | 0.880 ± 0.105 (3) |" in global_part
    assert "| fedprox: interaction (do they add up?) | -0.0200 | 0.0100 | 3 |" in global_part
    assert_png(tmp_path / "figures" / "strategy_comparison_global.png")
    assert_png(tmp_path / "figures" / "strategy_rounds.png")
    # FedAvg and FedProx share (beta, k): the study's figures are skipped, saying why
    assert "skipped macro_f1_vs_k_minority: test-macro-f1 vs k: 2 cells" in capsys.readouterr().out


def test_strategy_comparison_is_checked_on_the_last_rounds_mean(tmp_path):
    strategies_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    assert "global-test-accuracy-last3" not in strategies.comparison_report(final_runs)
    # the fixture's runs have 2 rounds; give them a last-3 mean 0.3 below the final number
    final_runs["global-test-accuracy-last3"] = final_runs["global-test-accuracy"] - 0.3
    report = strategies.comparison_report(final_runs)
    section = report.split("(`global-test-accuracy-last3`): a check against one round's swing")
    assert len(section) == 2 and "## The global model's accuracy on" in section[0]
    # the means shift by 0.3, the paired differences stay those of the last round
    assert "| fedprox | 0.500 ± 0.100 (3) | 0.580 ± 0.105 (3) |" in section[1]
    assert "| fedprox: interaction (do they add up?) | -0.0200 | 0.0100 | 3 |" in section[1]


def test_strategies_per_round_draw_a_line_per_strategy_and_synthetic_images(tmp_path):
    strategies_sweep(tmp_path)
    tables = write_tables(tmp_path)
    figure = strategies.plot_strategy_rounds(tables.rounds_cells)
    (axis,) = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {
        "fedavg (n=3)",
        "fedavg + synthetic (n=3)",
        "fedprox (n=3)",
        "fedprox + synthetic (n=3)",
    }
    # every round's global test accuracy is the run's F1 + 0.1: FedProx without synthetic
    # images 0.55, 0.65, 0.75 over the seeds, so 0.75 in both rounds; dashed with them
    assert list(lines["fedprox (n=3)"].get_xdata()) == [1, 2]
    assert lines["fedprox (n=3)"].get_ydata() == pytest.approx([0.75, 0.75])
    assert lines["fedprox + synthetic (n=3)"].get_linestyle() == "--"
    assert lines["fedavg + synthetic (n=3)"].get_ydata() == pytest.approx([0.8, 0.8])
    with pytest.raises(strategies.FigureError, match="needs classifier rounds"):
        strategies.plot_strategy_rounds(tables.rounds_cells.drop(columns=["clf-strategy"]))


def test_strategy_comparison_needs_fedavg_with_and_without_synthetic_images(tmp_path):
    strategies_sweep(tmp_path)
    final_runs = write_tables(tmp_path).final_runs
    with pytest.raises(strategies.FigureError, match="needs FedAvg and another clf-strategy"):
        strategies.comparisons(final_runs[final_runs["clf-strategy"] == "fedprox"])
    with pytest.raises(strategies.FigureError, match="needs FedAvg and another clf-strategy"):
        strategies.comparisons(final_runs[final_runs["imputation"] == "none"])


def test_imputation_claims_are_checked_on_the_last_rounds_mean(imputation_tables):
    final_runs = imputation_tables.final_runs.copy()
    assert "## Imputation: global-test-accuracy-last3" not in claims.claims_report(final_runs)
    # the fixture's runs have 2 rounds; give them a last-3 mean 0.2 below the final number
    final_runs["global-test-accuracy-last3"] = final_runs["global-test-accuracy"] - 0.2
    report = claims.claims_report(final_runs)
    section = report.split("## Imputation: global-test-accuracy-last3")[1].split("## ")[0]
    assert "averaged over the last 3" in section
    # the same paired differences as on the last round, with the study's sign but not its number
    assert (
        "| minority - uniform, mean over betas and k > 0 | 0.1, 10 | +0.0550 | 0.0100 | 3 "
        "| [+0.0302, +0.0798] | " in section
    )
    assert "| + |  |  | agrees |" in section


def test_test_loss_claims_say_where_synthetic_images_change_the_loss(imputation_tables):
    """The study: test losses "do not seem to be affected by the number of imputed data
    points" (Figure 8). Where an interval of ours excludes zero, the verdict is "differs"."""
    runs = imputation_tables.final_runs.copy()
    # no synthetic images: loss 1.0; with them: 0.3, 0.31, 0.32 lower (seeds 0-2) at
    # beta 0.1 and unchanged at beta 10
    lower = np.isclose(runs["dirichlet-beta"], 0.1) & (runs["num-synthetic"] > 0)
    runs["test-loss"] = 1.0 - lower * (0.3 + runs["seed"] / 100)
    table = claims.test_loss_claims(runs).set_index(["comparison", "betas"])
    at_01 = table.loc[("minority k = 100 (50%) - no synthetic", "0.1")]
    assert at_01["mean"] == pytest.approx(-0.31)
    assert (at_01["study"], at_01["verdict"]) == ("0", "differs")
    assert table.loc[("uniform k = 100 (50%) - no synthetic", "0.1"), "verdict"] == "differs"
    unchanged = table.loc[("minority k = 100 (50%) - no synthetic", "10")]
    assert unchanged["mean"] == pytest.approx(0.0) and unchanged["verdict"] == "inconclusive"
    # pooled over both betas: -0.155 per seed on average, no spread to speak of
    both = table.loc[("uniform k = 100 (50%) - no synthetic", "0.1, 10")]
    assert both["mean"] == pytest.approx(-0.155)
    # no minority - uniform row: the study says nothing of the modes' losses
    assert not any(name.startswith("minority - uniform") for name, _ in table.index)
    report = claims.claims_report(runs)
    section = report.split("## Test loss: test-loss")[1].split("## ")[0]
    assert "Figure 8" in section and "| 0 |  |  | differs |" in section
    assert "## Test loss: global-test-loss" in report


def test_runs_of_one_imputation_mode_get_its_claims_and_the_recalibrated_table(imputation_tables):
    """conf/batchnorm-statistics.yaml has minority imputation only, and the
    bn-recalibration-images score: its claims are minority - none, also on that score."""
    runs = imputation_tables.final_runs
    minority_only = runs[runs["imputation"] != "uniform"].copy()
    # the recalibrated score: the global accuracy plus 0.1 where minority images were added
    minority_only[claims.RECALIBRATED_METRIC] = minority_only["global-test-accuracy"] + 0.1 * (
        minority_only["num-synthetic"] > 0
    )
    table = claims.imputation_claims(minority_only, claims.RECALIBRATED_METRIC)
    assert not table["comparison"].str.contains("uniform").any()
    plain = claims.imputation_claims(minority_only, claims.IMPUTATION_FIGURE_METRIC)
    shifted = table.set_index(["comparison", "betas"])["mean"]
    expected = plain.set_index(["comparison", "betas"])["mean"] + 0.1
    assert shifted.to_dict() == pytest.approx(expected.to_dict())
    report = claims.claims_report(minority_only)
    assert f"## Imputation: {claims.RECALIBRATED_METRIC}" in report
    assert "measured anew" in report
    # runs without the score (every campaign so far) have no such table
    assert claims.RECALIBRATED_METRIC not in claims.claims_report(runs)
    with pytest.raises(figures.FigureError, match="uniform or minority"):
        claims.imputation_claims(runs[runs["num-synthetic"] == 0])
