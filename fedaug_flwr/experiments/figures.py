"""The study's figures and Table 1, drawn from a sweep's aggregated tables.

Every function takes tables from :mod:`fedaug_flwr.experiments.aggregate`
(pandas DataFrames) and writes one PNG (or Markdown file); error bars and
bands are +- 1 sample standard deviation over seeds, and every figure says
``n`` (runs per point). Figures are built with matplotlib's object API
(``Figure``), so they work under any backend, in scripts and notebooks alike.

Runs without synthetic images (``imputation='none'`` or ``num-synthetic=0``)
are the k = 0 point of both the uniform and the minority curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedaug_flwr.experiments.aggregate import (
    BETA,
    F1,
    IMPUTATION_MODES,
    MODE,
    FigureError,
    K,
    Tables,
    imputation_curve,
    is_baseline,
    require_one_cell,
    require_one_cell_per_point,
    write_tables,
)
from fedaug_flwr.experiments.campaign import campaign_progress
from fedaug_flwr.experiments.claims import CLAIM_SETS, claim_tables, claims_report, plot_claims
from fedaug_flwr.experiments.generators import generator_quality_markdown, plot_generator_quality
from fedaug_flwr.experiments.runner import read_spec, run_dir
from fedaug_flwr.experiments.strategies import (
    GLOBAL_ACCURACY,
    comparison_report,
    labelled,
    plot_strategy_comparison,
    plot_strategy_rounds,
)
from fedaug_flwr.experiments.tradeoff import plot_privacy_tradeoff, tradeoff_markdown
from fedaug_flwr.results import read_summary, write_atomic

FIGURES_DIR = "figures"
# The study's figures plot the global model on the MNIST test set: micro-F1 (= accuracy)
# in its imputation figures, macro-F1 in its finetune comparison (docs/study.md).
STUDY_IMPUTATION_METRIC = "global-test-accuracy"
STUDY_FINETUNE_METRIC = "global-test-macro-f1"
METRIC_LABELS = {
    F1: "client test macro-F1 (mean over clients)",
    "global-test-accuracy": "global test accuracy (= micro-F1; the study's Figures 9-12)",
    "global-test-macro-f1": "global test macro-F1 (the study's Figure 15)",
    "global-test-recalibrated-accuracy": "global test accuracy, BatchNorm statistics measured anew",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a PNG atomically, legends outside the axes included."""
    path = Path(path)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def _require(table: pd.DataFrame, columns: Sequence[str], figure: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise FigureError(f"{figure} needs column(s) {missing}, which this sweep's tables lack")
    if table.empty:
        raise FigureError(f"{figure}: the table has no rows (no complete runs yet?)")


def _fmt_beta(beta: float) -> str:
    return f"{float(beta):g}"


# --------------------------------------------------------------------- data


def plot_label_distributions(
    labels: np.ndarray,
    betas: Sequence[float],
    num_clients: int,
    seed: int,
    min_partition_size: int,
    path: Path,
    max_clients: int = 30,
) -> Path:
    """Client label distributions per beta (flwr-datasets' plot, the app's partitioner)."""
    from flwr_datasets.visualization import plot_label_distributions as flwr_plot

    from fedaug_flwr.partition import dirichlet_split, split_partitioner

    if not betas:
        raise FigureError("label distributions: no dirichlet-beta values to draw")
    shown = min(num_clients, max_clients)
    figure = Figure(figsize=(max(4.0, 0.22 * shown + 1.5) * len(betas), 3.8))
    axes = figure.subplots(1, len(betas), squeeze=False)[0]
    for index, (axis, beta) in enumerate(zip(axes, betas, strict=True)):
        split = dirichlet_split(labels, num_clients, beta, seed, min_partition_size)
        partitioner = split_partitioner(labels, split)
        flwr_plot(
            partitioner,
            label_name="label",
            plot_type="bar",
            size_unit="absolute",
            max_num_partitions=shown,
            axis=axis,
            title=f"beta = {_fmt_beta(beta)}",
            legend=index == len(betas) - 1,
            legend_title="label",
            verbose_labels=False,  # our labels are plain ints, not a ClassLabel feature
        )
        axis.set_xlabel("client (partition id)")
        axis.set_ylabel("images" if index == 0 else "")
    more = f", first {shown} of {num_clients} clients" if shown < num_clients else ""
    figure.suptitle(
        f"Client label distributions (Dirichlet split of {len(labels)} images, seed {seed}{more})",
        y=1.02,
    )
    return save_figure(figure, path)


def plot_imputation_example(
    clients: pd.DataFrame,
    path: Path,
    beta: float | None = None,
    seed: int | None = None,
    partition_id: int = 0,
    mode: str = "minority",
) -> Path:
    """One client's label counts before and after imputation, one bar group per k."""
    _require(clients, [BETA, MODE, K, "seed", "partition-id", "before-0"], "imputation example")
    beta = float(clients[BETA].min()) if beta is None else beta
    seed = int(clients["seed"].min()) if seed is None else seed
    chosen = clients[
        np.isclose(clients[BETA], beta)
        & (clients["seed"] == seed)
        & (clients["partition-id"] == partition_id)
    ]
    curve = imputation_curve(chosen, mode).sort_values(K)
    if curve.empty or (curve[K] > 0).sum() == 0:
        raise FigureError(
            f"imputation example: no {mode} runs with synthetic images for beta={beta}, "
            f"seed={seed}, client {partition_id}"
        )
    labels = np.arange(10)
    before = curve.iloc[0][[f"before-{label}" for label in labels]].to_numpy(float)
    bars = [("before (real only)", before)]
    for _, row in curve[curve[K] > 0].drop_duplicates(K).iterrows():
        after = row[[f"after-{label}" for label in labels]].to_numpy(float)
        bars.append((f"after, k = {int(row[K])}", after))
    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    width = 0.8 / len(bars)
    for i, (name, counts) in enumerate(bars):
        axis.bar(labels + (i - (len(bars) - 1) / 2) * width, counts, width, label=name)
    axis.set_xticks(labels)
    axis.set_xlabel("label")
    axis.set_ylabel("training images")
    axis.set_title(
        f"Client {partition_id}, beta = {_fmt_beta(beta)}, seed {seed}: label counts before and "
        f"after {mode} imputation"
    )
    axis.legend()
    return save_figure(figure, path)


# --------------------------------------------------------------------- imputation grid


ROUND_METRICS = {
    "test-loss": ("client test loss", "Test loss (mean over clients)"),
    "global-test-accuracy": (
        "global test accuracy",
        "Global model's test accuracy (the study's imputation metric)",
    ),
}


def plot_per_round(
    rounds_cells: pd.DataFrame,
    path: Path,
    modes: Sequence[str] = IMPUTATION_MODES,
    metric: str = "test-loss",
) -> Path:
    """A classifier metric per round (:data:`ROUND_METRICS`; default the clients' test
    loss), one line per k; rows = mode, columns = beta."""
    ylabel, title = ROUND_METRICS[metric]
    mean_column, std_column = f"{metric}-mean", f"{metric}-std"
    _require(rounds_cells, [BETA, MODE, K, "phase", "round", mean_column], title)
    table = rounds_cells[rounds_cells["phase"] == "classifier"]
    if not any((imputation_curve(table, mode)[K] > 0).any() for mode in modes):
        raise FigureError(f"{title} per round: no runs with {' or '.join(modes)} imputation")
    for mode in modes:
        require_one_cell_per_point(imputation_curve(table, mode), f"{title} per round")
    betas = sorted(table[BETA].unique())
    rounds = sorted(int(r) for r in table["round"].unique())
    figure = Figure(figsize=(3.4 * len(betas) + 1.5, 3.0 * len(modes)))
    axes = figure.subplots(len(modes), len(betas), squeeze=False, sharex=True, sharey=True)
    for row, mode in enumerate(modes):
        curve = imputation_curve(table, mode)
        for col, beta in enumerate(betas):
            axis = axes[row][col]
            for k, lines in curve[np.isclose(curve[BETA], beta)].groupby(K):
                lines = lines.sort_values("round")
                mean = lines[mean_column].to_numpy(float)
                std = np.nan_to_num(lines[std_column].to_numpy(float))
                label = f"k = {int(k)} (n={int(lines['n'].min())})"
                if len(lines) == 1:  # one round: a point with its error bar, not a line
                    axis.errorbar(lines["round"], mean, yerr=std, fmt="o", capsize=3, label=label)
                    continue
                axis.plot(lines["round"], mean, marker="o", ms=3, label=label)
                axis.fill_between(lines["round"], mean - std, mean + std, alpha=0.2)
            axis.set_title(f"{mode}, beta = {_fmt_beta(beta)}")
            axis.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
            if len(rounds) <= 10:
                axis.set_xticks(rounds)
            else:
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == len(modes) - 1:
                axis.set_xlabel("round")
            if col == 0:
                axis.set_ylabel(ylabel)
            axis.legend(fontsize=7)
    figure.suptitle(f"{title} per round; band or bar = +-1 std over seeds")
    return save_figure(figure, path)


def _synthetic_share(table: pd.DataFrame) -> dict[int, float]:
    column = "synthetic-fraction-mean" if "synthetic-fraction-mean" in table else None
    if column is None:
        return {}
    return {int(k): float(v) for k, v in table.groupby(K)[column].mean().items()}


def _k_positions(ks: Sequence[int]) -> dict[int, int]:
    """Evenly spaced x positions for the k values (the study's k are 0, 100, 500, 1000)."""
    return {int(k): i for i, k in enumerate(sorted(ks))}


def _k_ticks(axis, positions: dict[int, int], share: dict[int, float]) -> None:
    axis.set_xticks(list(positions.values()))
    axis.set_xticklabels(
        [f"{k}\n({100 * share[k]:.0f}%)" if k in share else str(k) for k in positions],
        fontsize=8,
    )
    axis.set_xlabel("k synthetic images per client (share of training data)")


def plot_macro_f1_vs_k(final_cells: pd.DataFrame, path: Path, mode: str, metric: str = F1) -> Path:
    """A final metric (client macro-F1 by default) against k, one line per beta, +-1 std."""
    _require(final_cells, [BETA, MODE, K, f"{metric}-mean", f"{metric}-std", "n"], f"{metric} vs k")
    curve = imputation_curve(final_cells, mode)
    if (curve[K] > 0).sum() == 0:
        raise FigureError(f"{metric} vs k: no runs with {mode} imputation")
    require_one_cell_per_point(curve, f"{metric} vs k")
    positions = _k_positions(curve[K].unique())
    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    for beta, lines in curve.groupby(BETA):
        lines = lines.sort_values(K)
        axis.errorbar(
            lines[K].map(positions),
            lines[f"{metric}-mean"],
            yerr=np.nan_to_num(lines[f"{metric}-std"].to_numpy(float)),
            marker="o",
            capsize=3,
            label=f"beta = {_fmt_beta(beta)} (n={int(lines['n'].min())})",
        )
    _k_ticks(axis, positions, _synthetic_share(curve))
    axis.set_ylabel(metric_label(metric))
    axis.set_title(f"{metric} against k, {mode} imputation (+-1 std over seeds)")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def averaged_over_beta(final_runs: pd.DataFrame, metric: str = F1) -> pd.DataFrame:
    """Per mode and k: mean over betas within each seed, then mean / std / n over seeds."""
    _require(final_runs, [BETA, MODE, K, "seed", metric], "average over beta")
    frames = []
    for mode in IMPUTATION_MODES:
        curve = imputation_curve(final_runs, mode)
        if (curve[K] > 0).sum() == 0:
            continue
        require_one_cell_per_point(curve, "average over beta")
        betas = curve[BETA].nunique()
        grouped = curve.groupby([K, "seed"])[metric]
        per_seed = grouped.mean()[grouped.count() == betas].reset_index()  # seeds with every beta
        stats = per_seed.groupby(K)[metric].agg(["mean", "std", "count"]).reset_index()
        stats.insert(0, MODE, mode)
        stats["betas"] = betas
        frames.append(stats.rename(columns={"count": "n"}))
    if not frames:
        raise FigureError("average over beta: no runs with uniform or minority imputation")
    return pd.concat(frames, ignore_index=True)


def plot_macro_f1_vs_k_averaged(final_runs: pd.DataFrame, path: Path, metric: str = F1) -> Path:
    """A final metric against k averaged over all betas, uniform against minority."""
    table = averaged_over_beta(final_runs, metric)
    positions = _k_positions(table[K].unique())
    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    for mode, lines in table.groupby(MODE, sort=False):
        axis.errorbar(
            lines[K].map(positions),
            lines["mean"],
            yerr=np.nan_to_num(lines["std"].to_numpy(float)),
            marker="o",
            capsize=3,
            label=f"{mode} (n={int(lines['n'].min())} seeds)",
        )
    share = {}
    if "synthetic-fraction" in final_runs:
        share = {
            int(k): float(v) for k, v in final_runs.groupby(K)["synthetic-fraction"].mean().items()
        }
    _k_ticks(axis, positions, share)
    axis.set_ylabel(f"{metric_label(metric)}, mean over betas")
    axis.set_title(
        f"{metric} against k, averaged over {int(table['betas'].max())} betas (+-1 std over seeds)"
    )
    axis.legend()
    return save_figure(figure, path)


# --------------------------------------------------------------------- finetune comparison


def finetune_comparison(
    final_cells: pd.DataFrame, pretrain_mode: str = "federated", metric: str = F1
) -> pd.DataFrame:
    """Per beta: vanilla (pretrain off, no synthetic images), pretrained and fine-tuned
    ``metric`` (mean, std, n)."""
    needed = [BETA, "pretrain", f"{metric}-mean", f"pretrained-{metric}-mean"]
    if "pretrain" not in final_cells.columns or f"pretrained-{metric}-mean" not in final_cells:
        raise FigureError(f"finetune comparison needs column(s) {needed} (runs with pretraining)")
    plain = is_baseline(final_cells) if MODE in final_cells and K in final_cells else True
    vanilla = final_cells[(final_cells["pretrain"] == "off") & plain]
    tuned = final_cells[(final_cells["pretrain"] == pretrain_mode) & plain]
    rows = []
    for beta in sorted(final_cells[BETA].unique()):
        for name, table, prefix in (
            ("vanilla", vanilla, ""),
            ("pretrained", tuned, "pretrained-"),
            ("finetuned", tuned, ""),
        ):
            match = table[np.isclose(table[BETA], beta)]
            if match.empty:
                continue
            require_one_cell(match, f"finetune comparison, {name} model at beta={beta:g}")
            row = match.iloc[0]
            rows.append(
                {
                    BETA: beta,
                    "model": name,
                    "mean": row[f"{prefix}{metric}-mean"],
                    "std": row[f"{prefix}{metric}-std"],
                    "n": int(row["n"]),
                }
            )
    if not rows:
        raise FigureError(f"finetune comparison: no runs with pretrain 'off' or '{pretrain_mode}'")
    return pd.DataFrame(rows)


def plot_finetune_comparison(
    final_cells: pd.DataFrame, path: Path, pretrain_mode: str = "federated", metric: str = F1
) -> Path:
    """Grouped bars per beta: vanilla / pretrained / fine-tuned ``metric``, +-1 std where a
    bar has 2 seeds or more, each bar's number of seeds written on it."""
    table = finetune_comparison(final_cells, pretrain_mode, metric)
    betas = sorted(table[BETA].unique())
    models = [m for m in ("vanilla", "pretrained", "finetuned") if m in set(table["model"])]
    figure = Figure(figsize=(1.6 * len(betas) + 3, 4.2))
    axis = figure.subplots()
    width = 0.8 / len(models)
    positions = np.arange(len(betas))
    for i, model in enumerate(models):
        rows = table[table["model"] == model].set_index(BETA).reindex(betas)
        offsets = positions + (i - (len(models) - 1) / 2) * width
        # a single seed has no std: no error bar rather than one of length zero
        bars = axis.bar(offsets, rows["mean"], width, yerr=rows["std"], capsize=3, label=model)
        counts = ["" if pd.isna(n) else f"n={int(n)}" for n in rows["n"]]
        axis.bar_label(bars, counts, label_type="center", fontsize=8, color="white")
    axis.set_xticks(positions, [_fmt_beta(b) for b in betas])
    axis.set_xlabel("dirichlet beta (smaller = more skewed)")
    axis.set_ylabel(metric_label(metric))
    title = f"Vanilla FedAvg vs {pretrain_mode} pretraining on synthetic data (+-1 std)"
    if (table.groupby(BETA)["n"].nunique() > 1).any():
        # bars over different seeds mix the seeds' differences into the models'
        title += "\nunequal seeds: bars not paired (claims.md pairs them)"
    axis.set_title(title)
    axis.legend()
    return save_figure(figure, path)


def table1_markdown(final_runs: pd.DataFrame, pretrain_mode: str = "federated") -> str:
    """Table 1: final pretraining train loss (synthetic) and test losses, per beta."""
    needed = ["pretrain", BETA, "pretrain-train-loss", "pretrain-real-test-loss"]
    _require(final_runs, needed, "Table 1")
    runs = final_runs[final_runs["pretrain"] == pretrain_mode]
    if runs.empty:
        raise FigureError(f"Table 1: no runs with pretrain='{pretrain_mode}'")
    columns = [
        ("pretrain-train-loss", "train loss (synthetic)"),
        ("pretrain-synthetic-test-loss", "test loss (synthetic)"),
        ("pretrain-real-test-loss", "test loss (real)"),
    ]
    columns = [(c, title) for c, title in columns if c in runs]
    lines = [
        "| beta | " + " | ".join(title for _, title in columns) + " | n |",
        "|---:|" + "---:|" * len(columns) + "---:|",
    ]
    for beta, group in runs.groupby(BETA):
        cells = [_mean_std(group[c]) for c, _ in columns]
        lines.append(f"| {_fmt_beta(beta)} | " + " | ".join(cells) + f" | {len(group)} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: pd.Series) -> str:
    """The values' mean and std as "mean +- std", or the mean alone for one value."""
    if len(values) < 2:
        return f"{values.mean():.4f}"
    return f"{values.mean():.4f} +- {values.std():.4f}"


# (column, header) of the per-cell table: the clients' numbers, then the global model's.
CELL_COLUMNS = (
    (F1, "client macro-F1"),
    ("test-macro-f1-present", "client macro-F1, present labels"),
    ("test-accuracy", "client accuracy"),
    (STUDY_IMPUTATION_METRIC, "global accuracy"),
    (f"{STUDY_IMPUTATION_METRIC}-last3", "global accuracy, last 3 rounds"),
    (STUDY_FINETUNE_METRIC, "global macro-F1"),
)


def cells_markdown(final_cells: pd.DataFrame) -> str:
    """Final numbers per cell, mean +- std over seeds (n), one row per cell in grid order."""
    _require(final_cells, ["cell", "n"], "cells table")
    columns = [(c, title) for c, title in CELL_COLUMNS if f"{c}-mean" in final_cells]
    if final_cells.empty or not columns:
        raise FigureError("cells table: no complete runs with final metrics yet")
    lines = [
        "| cell | n | " + " | ".join(title for _, title in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for row in final_cells.to_dict("records"):
        values = []
        for column, _ in columns:
            mean, std = row[f"{column}-mean"], row[f"{column}-std"]
            text = "-" if pd.isna(mean) else f"{mean:.3f}"
            values.append(text if pd.isna(std) else f"{text} +- {std:.3f}")
        lines.append(f"| {row['cell']} | {int(row['n'])} | " + " | ".join(values) + " |")
    legend = (
        "Final numbers per cell, mean +- std over seeds (n runs). Client numbers: mean "
        "over the clients' real test splits (macro-F1 over the labels in truth or "
        "prediction, and over the labels present in the split). Global: the global model "
        "on the data set's test set, after the last round (and its accuracy averaged "
        "over the last 3 rounds); its accuracy is the micro-F1 of the study's imputation "
        "figures, its macro-F1 that of its finetune figure. A column may rest on fewer "
        "runs than n where older runs lack it.\n\n"
    )
    return legend + "\n".join(lines) + "\n"


def runs_markdown(rounds_runs: pd.DataFrame, metric: str = "global-test-accuracy") -> str:
    """``metric`` after every classifier round, one row per run (cell, seed) in the
    tables' order: the curve of each run, where a mean over seeds hides one run's swings."""
    _require(rounds_runs, ["cell", "seed", "phase", "round", metric], "runs table")
    table = rounds_runs[rounds_runs["phase"] == "classifier"].dropna(subset=[metric])
    if table.empty:
        raise FigureError(f"runs table: no classifier round with {metric} yet")
    rounds = sorted(int(r) for r in table["round"].unique())
    lines = [
        "| cell | seed | " + " | ".join(str(r) for r in rounds) + " |",
        "|---|---:|" + "---:|" * len(rounds),
    ]
    for (cell, seed), run in table.groupby(["cell", "seed"], sort=False):
        by_round = dict(zip(run["round"].astype(int), run[metric], strict=True))
        values = ["-" if r not in by_round else f"{by_round[r]:.3f}" for r in rounds]
        lines.append(f"| {cell} | {int(seed)} | " + " | ".join(values) + " |")
    legend = (
        f"{metric} after each classifier round (columns: rounds), one row per run; "
        "- : no such round in that run.\n\n"
    )
    return legend + "\n".join(lines) + "\n"


# --------------------------------------------------------------------- all at once


@dataclass
class Drawn:
    """What :func:`draw_all` wrote, and what it skipped and why."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def draw_all(sweep_dir: Path, label_seed: int | None = None) -> Drawn:
    """Aggregate a sweep folder, then draw every figure its results support."""
    sweep_dir = Path(sweep_dir)
    spec = read_spec(sweep_dir)
    tables = write_tables(sweep_dir)
    out = sweep_dir / FIGURES_DIR
    drawn = Drawn()

    def attempt(name: str, draw) -> None:
        try:
            drawn.written.append(draw())
        except FigureError as error:
            drawn.skipped[name] = str(error)

    attempt("label_distributions", lambda: _label_distributions(spec, sweep_dir, tables, out))
    attempt(
        "imputation_example",
        lambda: plot_imputation_example(tables.clients_runs, out / "imputation_example.png"),
    )
    attempt(
        "test_loss_per_round",
        lambda: plot_per_round(tables.rounds_cells, out / "test_loss_per_round.png"),
    )
    attempt(
        "global_accuracy_per_round",
        lambda: plot_per_round(
            tables.rounds_cells,
            out / "global_accuracy_per_round.png",
            metric=STUDY_IMPUTATION_METRIC,
        ),
    )
    for mode in IMPUTATION_MODES:
        attempt(
            f"macro_f1_vs_k_{mode}",
            lambda m=mode: plot_macro_f1_vs_k(
                tables.final_cells, out / f"macro_f1_vs_k_{m}.png", m
            ),
        )
    attempt(
        "macro_f1_vs_k_averaged",
        lambda: plot_macro_f1_vs_k_averaged(tables.final_runs, out / "macro_f1_vs_k_averaged.png"),
    )
    attempt(
        "finetune_comparison",
        lambda: plot_finetune_comparison(tables.final_cells, out / "finetune_comparison.png"),
    )
    # the same on the metric the study's own figures plot (docs/study.md)
    for mode in IMPUTATION_MODES:
        attempt(
            f"global_accuracy_vs_k_{mode}",
            lambda m=mode: plot_macro_f1_vs_k(
                tables.final_cells,
                out / f"global_accuracy_vs_k_{m}.png",
                m,
                STUDY_IMPUTATION_METRIC,
            ),
        )
    attempt(
        "global_accuracy_vs_k_averaged",
        lambda: plot_macro_f1_vs_k_averaged(
            tables.final_runs, out / "global_accuracy_vs_k_averaged.png", STUDY_IMPUTATION_METRIC
        ),
    )
    attempt(
        "finetune_comparison_global",
        lambda: plot_finetune_comparison(
            tables.final_cells,
            out / "finetune_comparison_global.png",
            "federated",
            STUDY_FINETUNE_METRIC,
        ),
    )

    def table1() -> Path:
        text = table1_markdown(tables.final_runs)
        return write_atomic(out / "table1.md", lambda tmp: tmp.write_text(text))

    attempt("table1", table1)

    def cells() -> Path:
        text = cells_markdown(tables.final_cells)
        return write_atomic(out / "cells.md", lambda tmp: tmp.write_text(text))

    attempt("cells", cells)

    def runs() -> Path:
        text = runs_markdown(tables.rounds_runs)
        return write_atomic(out / "runs.md", lambda tmp: tmp.write_text(text))

    attempt("runs", runs)

    def claims() -> Path:
        text = claims_report(tables.final_runs)
        return write_atomic(out / "claims.md", lambda tmp: tmp.write_text(text))

    attempt("claims", claims)
    why_not: dict[str, str] = {}
    claim_sets = claim_tables(tables.final_runs, why_not)
    for title, _, _ in CLAIM_SETS:
        name = f"claims_{title.lower().replace('-', '').replace(' ', '_')}"

        def forest(title: str = title, name: str = name) -> Path:
            if title not in claim_sets:
                raise FigureError(why_not.get(title, f"{title.lower()} claims: no comparison"))
            return save_figure(plot_claims(claim_sets[title], title), out / f"{name}.png")

        attempt(name, forest)

    def generator_quality() -> Path:
        text = generator_quality_markdown(tables.final_runs)  # raises first without checks
        write_atomic(out / "generator_quality.md", lambda tmp: tmp.write_text(text))
        figure = plot_generator_quality(tables.final_runs)
        return save_figure(figure, out / "generator_quality.png")

    attempt("generator_quality", generator_quality)

    def privacy_tradeoff() -> Path:
        text = tradeoff_markdown(tables.final_runs)  # raises first when budgets are not swept
        write_atomic(out / "privacy_tradeoff.md", lambda tmp: tmp.write_text(text))
        return save_figure(plot_privacy_tradeoff(tables.final_runs), out / "privacy_tradeoff.png")

    attempt("privacy_tradeoff", privacy_tradeoff)

    def strategy_comparison() -> Path:
        text = comparison_report(tables.final_runs)  # raises first without the strategies
        write_atomic(out / "strategy_comparison.md", lambda tmp: tmp.write_text(text))
        figure = plot_strategy_comparison(tables.final_runs)
        return save_figure(figure, out / "strategy_comparison.png")

    attempt("strategy_comparison", strategy_comparison)
    attempt(
        "strategy_comparison_global",
        lambda: save_figure(
            plot_strategy_comparison(tables.final_runs, GLOBAL_ACCURACY),
            out / "strategy_comparison_global.png",
        ),
    )

    def strategy_rounds() -> Path:
        labelled(tables.final_runs)  # the same sweeps as the comparison, or a reason why not
        figure = plot_strategy_rounds(tables.rounds_cells)
        return save_figure(figure, out / "strategy_rounds.png")

    attempt("strategy_rounds", strategy_rounds)

    def progress() -> Path:
        if not spec.stages:
            raise FigureError("not a campaign: its experiment file has no stages")
        text = campaign_progress(spec, sweep_dir)
        return write_atomic(out / "progress.md", lambda tmp: tmp.write_text(text))

    attempt("progress", progress)
    return drawn


def _label_distributions(spec, sweep_dir: Path, tables: Tables, out: Path) -> Path:
    from fedaug_flwr.data import IDX_DATASETS, DataError, data_dir_for, load_source

    if tables.final_runs.empty or BETA not in tables.final_runs:
        raise FigureError("label distributions: no complete runs yet")
    first = tables.final_runs.iloc[0]
    run = next(r for r in spec.runs() if r.cell.name == first["cell"] and r.seed == first["seed"])
    summary = read_summary(run_dir(sweep_dir, run))
    source, location = summary["data"]["source"], summary["data"]["location"]
    if source in IDX_DATASETS and not Path(location).is_dir():
        # published results name no folder (or one of another machine): this machine's
        # copy of the data set, as a run would find it ($FEDAUG_DATA_DIR, ...)
        location = str(data_dir_for("", source))
    try:
        data = load_source(source, location)
    except (DataError, OSError) as error:
        variable = f" (set ${IDX_DATASETS[source].env_var})" if source in IDX_DATASETS else ""
        raise FigureError(
            f"label distributions: the run's data is not here{variable}: {error}"
        ) from error
    config = summary["config"]
    return plot_label_distributions(
        data.pool.labels,
        sorted(float(b) for b in tables.final_runs[BETA].unique()),
        num_clients=int(summary["data"]["num-clients"]),
        seed=int(config["seed"]),
        min_partition_size=int(config["min-partition-size"]),
        path=out / "label_distributions.png",
    )
