"""Augmentation against the algorithmic fixes for label skew: a sweep over the classifier's
server strategy (``clf-strategy``) with and without synthetic images, drawn as one figure
and summarized in one table per data set and beta.

Every comparison is paired by seed (a seed fixes the partition and the initial models), then
summarized over seeds with a 95 % t interval (:func:`fedaug_flwr.experiments.claims.interval`):

- each strategy against FedAvg, both without synthetic images (the algorithmic fix alone),
  and FedAvg with synthetic images against the strategy without (augmentation against the fix);
- synthetic images against none, under each strategy (augmentation alone);
- each strategy with synthetic images against FedAvg without (both fixes together);
- whether they add up: (strategy + synthetic - strategy) - (FedAvg + synthetic - FedAvg),
  the interaction; an interval that covers zero finds no departure from adding up, one
  below zero says the two fixes overlap (together less than the sum of their gains).

An interval that covers zero is reported as inconclusive. Every row also carries the
q value of its paired t test, adjusted over all of the table's comparisons
(:func:`fedaug_flwr.experiments.claims.with_q`).

The comparisons are made on the clients' macro-F1 and, separately, on the global model's
test accuracy (the study's metric for imputation), after the last round and averaged over
the last rounds (a final number can catch a model in one of its swings); a per-round
figure shows how each strategy got to its final number.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedaug_flwr.experiments.aggregate import BETA, F1, FigureError, K, is_baseline
from fedaug_flwr.experiments.claims import (
    LAST_ROUNDS_METRIC,
    direction,
    interval,
    p_value,
    q_text,
    with_q,
)

STRATEGY = "clf-strategy"
DATASET = "dataset"
REFERENCE = "fedavg"
AUGMENTED = "augmented"
GLOBAL_ACCURACY = "global-test-accuracy"
# What a comparison is made on, and how its section is headed
REPORTED = {
    F1: f"The clients' macro-F1 on their own test splits (`{F1}`, the app's headline metric)",
    GLOBAL_ACCURACY: (
        f"The global model's accuracy on the global test set (`{GLOBAL_ACCURACY}`, the study's"
        " metric)"
    ),
    # One round's number can swing far at strong skew; the check the study's claims get too
    LAST_ROUNDS_METRIC: (
        f"The global model's accuracy averaged over the last classifier rounds"
        f" (`{LAST_ROUNDS_METRIC}`): a check against one round's swing"
    ),
}


def labelled(final_runs: pd.DataFrame) -> pd.DataFrame:
    """``final_runs`` with an ``augmented`` column; a :class:`FigureError` unless the sweep
    compares FedAvg with another strategy, with and without synthetic images, one cell per
    (data set, beta, strategy, augmented)."""
    needed = [STRATEGY, BETA, K, "imputation", "seed", F1]
    missing = [c for c in needed if c not in final_runs]
    if missing or final_runs.empty:
        raise FigureError(
            f"strategy comparison: needs complete runs with columns {needed} (missing {missing})"
        )
    table = _marked(final_runs)
    strategies = set(table[STRATEGY])
    if REFERENCE not in strategies or len(strategies) < 2 or table[AUGMENTED].nunique() < 2:
        raise FigureError(
            "strategy comparison: needs FedAvg and another clf-strategy, each with and "
            f"without synthetic images (strategies here: {sorted(strategies)})"
        )
    keys = [DATASET, BETA, STRATEGY, AUGMENTED]
    cells = table.groupby(keys)["cell"].nunique()
    if (cells > 1).any():
        point = cells[cells > 1].index[0]
        raise FigureError(
            f"strategy comparison: {cells[point]} cells at {dict(zip(keys, point, strict=True))};"
            " the sweep varies more than data set, beta, strategy and synthetic images"
        )
    return table


def _marked(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with the ``augmented`` column, and an empty ``dataset`` where there is none."""
    table = table.copy()
    table[AUGMENTED] = ~is_baseline(table)
    if DATASET not in table:
        table[DATASET] = ""
    return table


def _groups(table: pd.DataFrame) -> list[tuple[str, float]]:
    return sorted({(str(d), float(b)) for d, b in zip(table[DATASET], table[BETA], strict=True)})


def _order(strategies) -> list[str]:
    """FedAvg first, the others in alphabetical order."""
    return [REFERENCE, *sorted(s for s in set(strategies) if s != REFERENCE)]


def _seed_values(per_seed: pd.DataFrame, strategy: str, augmented: bool) -> pd.Series:
    key = (strategy, augmented)
    return per_seed[key] if key in per_seed else pd.Series(dtype=float)


def _paired(name: str, differences: pd.Series, where: dict) -> dict | None:
    """One comparison's row: mean, std, n, 95 % interval and verdict (None without pairs)."""
    differences = differences.dropna()
    if differences.empty:
        return None
    low, high = interval(differences.to_list())
    return {
        **where,
        "comparison": name,
        "mean": float(differences.mean()),
        "std": float(differences.std()) if len(differences) > 1 else math.nan,
        "n": len(differences),
        "ci-low": low,
        "ci-high": high,
        "p": p_value(differences.to_list()),
        "verdict": direction(low, high),
    }


def comparisons(final_runs: pd.DataFrame, metric: str = F1) -> pd.DataFrame:
    """The paired comparisons of the module docstring, one row each per data set and beta:
    mean difference, sample std, n, the 95 % interval and what it supports."""
    table = labelled(final_runs)
    rows = []
    for dataset, beta in _groups(table):
        at = table[(table[DATASET] == dataset) & np.isclose(table[BETA], beta)]
        per_seed = at.pivot_table(index="seed", columns=[STRATEGY, AUGMENTED], values=metric)
        strategies = _order(at[STRATEGY])
        fedavg, fedavg_synthetic = (_seed_values(per_seed, REFERENCE, a) for a in (False, True))
        pairs: list[tuple[str, pd.Series]] = []
        for strategy in strategies[1:]:
            plain = _seed_values(per_seed, strategy, False)
            pairs.append((f"{strategy} - fedavg, no synthetic", plain - fedavg))
            against = f"fedavg + synthetic - {strategy}, no synthetic"
            pairs.append((against, fedavg_synthetic - plain))
        for strategy in strategies:
            plain, synthetic = (_seed_values(per_seed, strategy, a) for a in (False, True))
            pairs.append((f"{strategy}: synthetic - none", synthetic - plain))
        for strategy in strategies[1:]:
            plain, synthetic = (_seed_values(per_seed, strategy, a) for a in (False, True))
            pairs.append((f"{strategy} + synthetic - fedavg, no synthetic", synthetic - fedavg))
            pairs.append(
                (
                    f"{strategy}: interaction (do they add up?)",
                    (synthetic - plain) - (fedavg_synthetic - fedavg),
                )
            )
        where = {DATASET: dataset, BETA: beta}
        rows.extend(row for name, d in pairs if (row := _paired(name, d, where)) is not None)
    return with_q(pd.DataFrame(rows))


def comparison_markdown(final_runs: pd.DataFrame, metric: str = F1) -> str:
    """Mean ± std per strategy and synthetic images, then the paired comparisons."""
    table = labelled(final_runs)
    lines = [f"Final {metric}, mean ± std over seeds (n runs):", ""]
    for dataset, beta in _groups(table):
        at = table[(table[DATASET] == dataset) & np.isclose(table[BETA], beta)]
        ks = sorted(int(k) for k in at.loc[at[AUGMENTED], K].unique())
        synthetic = f"synthetic (k = {', '.join(map(str, ks))})" if ks else "synthetic"
        lines += [
            f"**{dataset or 'data'}, beta = {beta:g}**",
            "",
            f"| strategy | no synthetic | {synthetic} |",
            "| --- | ---: | ---: |",
        ]
        for strategy in _order(at[STRATEGY]):
            cells = []
            for augmented in (False, True):
                values = at[(at[STRATEGY] == strategy) & (at[AUGMENTED] == augmented)][metric]
                if values.empty:
                    cells.append("–")
                    continue
                spread = f" ± {values.std():.3f}" if len(values) > 1 else ""
                cells.append(f"{values.mean():.3f}{spread} ({len(values)})")
            lines.append(f"| {strategy} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += [
        "Paired by seed; 95 % t interval of the mean difference; an interval that covers "
        "zero is inconclusive. q: the paired t test's p value adjusted over all of this "
        "table's comparisons (Benjamini-Hochberg); an interval that excludes zero with "
        "q >= 0.05 may be a chance finding among so many comparisons.",
        "",
        "| data set | beta | comparison | mean | std | n | 95 % interval | q | verdict |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for _, row in comparisons(final_runs, metric).iterrows():
        span = (
            "–" if math.isnan(row["ci-low"]) else f"[{row['ci-low']:+.4f}, {row['ci-high']:+.4f}]"
        )
        std = "–" if math.isnan(row["std"]) else f"{row['std']:.4f}"
        lines.append(
            f"| {row[DATASET]} | {row[BETA]:g} | {row['comparison']} | {row['mean']:+.4f} | "
            f"{std} | {row['n']} | {span} | {q_text(row['q'])} | {row['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_report(final_runs: pd.DataFrame) -> str:
    """:func:`comparison_markdown` for every metric of :data:`REPORTED` the runs have, one
    section each; the q values are adjusted within each section's table."""
    sections = [
        f"## {heading}\n\n{comparison_markdown(final_runs, metric)}"
        for metric, heading in REPORTED.items()
        if metric in final_runs and final_runs[metric].notna().any()
    ]
    return "\n".join(sections)


def plot_strategy_comparison(final_runs: pd.DataFrame, metric: str = F1) -> Figure:
    """One panel per data set and beta: a bar pair per strategy (without / with synthetic
    images), the mean over seeds with ± 1 std, each seed as a dot."""
    table = labelled(final_runs)
    groups = _groups(table)
    figure = Figure(figsize=(4.2 * len(groups) + 1.0, 4.2))
    axes = figure.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    width = 0.38
    for axis, (dataset, beta) in zip(axes, groups, strict=True):
        at = table[(table[DATASET] == dataset) & np.isclose(table[BETA], beta)]
        strategies = _order(at[STRATEGY])
        for offset, augmented, label in (
            (-width / 2, False, "no synthetic"),
            (width / 2, True, "synthetic"),
        ):
            for i, strategy in enumerate(strategies):
                values = at[(at[STRATEGY] == strategy) & (at[AUGMENTED] == augmented)][metric]
                if values.empty:
                    continue
                color = "C1" if augmented else "C0"
                axis.bar(
                    i + offset,
                    values.mean(),
                    width,
                    yerr=values.std() if len(values) > 1 else 0.0,
                    capsize=3,
                    color=color,
                    alpha=0.75,
                    label=label if i == 0 else None,
                )
                axis.plot([i + offset] * len(values), values, "k.", markersize=4)
        axis.set_xticks(range(len(strategies)), strategies)
        runs = at.groupby([STRATEGY, AUGMENTED]).size()
        axis.set_title(
            f"{dataset + ', ' if dataset else ''}beta = {beta:g} (n = {runs.min()}-{runs.max()})",
            fontsize=10,
        )
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"final {metric} (mean over seeds, ± 1 std)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Server strategies with and without synthetic images; dots: seeds")
    return figure


def plot_strategy_rounds(rounds_cells: pd.DataFrame, metric: str = GLOBAL_ACCURACY) -> Figure:
    """One panel per data set and beta: ``metric`` after every classifier round, a line per
    strategy (solid without synthetic images, dashed with), the mean over seeds with a
    ± 1 std band. Where the final numbers hide a model that swings from round to round,
    this shows it."""
    mean_column, std_column = f"{metric}-mean", f"{metric}-std"
    needed = [STRATEGY, BETA, K, "imputation", "phase", "round", "n", mean_column]
    missing = [c for c in needed if c not in rounds_cells]
    if missing or not (rounds_cells["phase"] == "classifier").any():
        raise FigureError(
            f"strategies per round: needs classifier rounds with columns {needed} "
            f"(missing {missing})"
        )
    table = _marked(rounds_cells[rounds_cells["phase"] == "classifier"])
    groups = _groups(table)
    figure = Figure(figsize=(4.2 * len(groups) + 1.0, 4.0))
    axes = figure.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for axis, (dataset, beta) in zip(axes, groups, strict=True):
        at = table[(table[DATASET] == dataset) & np.isclose(table[BETA], beta)]
        for i, strategy in enumerate(_order(at[STRATEGY])):
            for augmented, style in ((False, "-"), (True, "--")):
                line = at[(at[STRATEGY] == strategy) & (at[AUGMENTED] == augmented)]
                if line.empty:
                    continue
                line = line.sort_values("round")
                mean = line[mean_column].to_numpy(float)
                std = np.nan_to_num(line[std_column].to_numpy(float))
                label = f"{strategy}{' + synthetic' if augmented else ''} (n={line['n'].min()})"
                axis.plot(line["round"], mean, style, color=f"C{i}", marker=".", label=label)
                axis.fill_between(line["round"], mean - std, mean + std, color=f"C{i}", alpha=0.15)
        axis.set_title(f"{dataset + ', ' if dataset else ''}beta = {beta:g}", fontsize=10)
        axis.set_xlabel("classifier round")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel(f"{metric} (mean over seeds, ± 1 std)")
    figure.suptitle("Server strategies per round; solid: no synthetic images, dashed: synthetic")
    return figure
