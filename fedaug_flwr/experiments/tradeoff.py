"""What the CVAE's differential privacy costs and buys: a sweep over privacy budgets drawn
as one figure and summarized in one table.

A run's **budget** is its ``cvae-dp-epsilon`` when its CVAE was trained with DP (its
summary then reports the epsilon spent, column ``cvae-dp-epsilon-spent``) and infinity
when it was not. Per budget the figure shows, over seeds, what a user pays and gets:
generator quality (a classifier trained on synthetic images, tested on real ones, beside
the same classifier trained on real images), the memorization audit's flagged share
(beside its chance level), the membership attacks' AUC (0.5 = nothing learned) and the
clients' final macro-F1. The table adds each budget's paired difference from the no-DP
runs of the same seed (same partition, same initial models) with a 95 % t interval; an
interval that covers zero is reported as inconclusive, and each difference carries the
q value of its paired t test, adjusted over all of the table's differences
(:func:`fedaug_flwr.experiments.claims.false_discovery_q`). Runs of the sweep without
synthetic images (``imputation = "none"`` or k = 0: no CVAE) are the reference: every
budget's macro-F1 is also compared with theirs, seed by seed, and the figure draws their
mean.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedaug_flwr.experiments.aggregate import F1, MODE, FigureError, K, is_baseline
from fedaug_flwr.experiments.claims import direction, false_discovery_q, interval, p_value, q_text

BUDGET = "budget"
NO_SYNTHETIC = "no synthetic images"
VS_NONE = f"{F1}-vs-none"  # a budget's macro-F1 minus the reference's, per seed
EPSILON_KEY, SPENT = "cvae-dp-epsilon", "cvae-dp-epsilon-spent"
SYNTHETIC_ACCURACY, REAL_ACCURACY = "quality-synthetic-accuracy", "quality-real-accuracy"
FLAGGED, FLAGGED_CHANCE = "privacy-flagged-share", "privacy-flagged-share-reference"
AUC_ATTACKS = {"privacy-auc-loss": "loss attack", "privacy-auc-generated-nearest": "nearest"}
# What the table compares with the no-DP runs, and how each is written.
PAIRED = {
    SYNTHETIC_ACCURACY: "train-on-synthetic accuracy",
    "privacy-auc-loss": "loss-attack AUC",
    F1: "client macro-F1",
}


def with_budgets(final_runs: pd.DataFrame) -> pd.DataFrame:
    """``final_runs`` with a ``budget`` column (infinity for runs without DP); a
    :class:`FigureError` when the sweep does not vary the budget."""
    needed = [EPSILON_KEY, F1]
    missing = [c for c in needed if c not in final_runs.columns]
    if missing or final_runs.empty:
        raise FigureError(
            f"privacy trade-off: needs a sweep over {EPSILON_KEY} with complete runs "
            f"(missing columns {missing})"
            if missing
            else "privacy trade-off: no complete runs yet"
        )
    table = final_runs.copy()
    if MODE in table and K in table:
        table = table[~is_baseline(table)]  # the reference runs: see reference_runs
    private = table[SPENT].notna() if SPENT in table else pd.Series(False, index=table.index)
    unbudgeted = private & ~(table[EPSILON_KEY] > 0)
    if unbudgeted.any():
        raise FigureError(
            "privacy trade-off: runs with DP but no budget (cvae-dp-epsilon = 0, a fixed "
            f"noise) cannot be placed on the budget axis: {sorted(table.loc[unbudgeted, 'cell'])}"
        )
    table[BUDGET] = np.where(private, table[EPSILON_KEY].astype(float), math.inf)
    if table[BUDGET].nunique() < 2:
        raise FigureError("privacy trade-off: the runs have a single privacy budget")
    return table


def reference_runs(final_runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep's runs without synthetic images (empty when it has none)."""
    if MODE not in final_runs or K not in final_runs:
        return final_runs.iloc[0:0]
    return final_runs[is_baseline(final_runs)]


def _budget_order(table: pd.DataFrame) -> list[float]:
    """No DP first, then budgets from the loosest to the tightest."""
    return sorted(table[BUDGET].unique(), reverse=True)


def budget_label(budget: float) -> str:
    return "∞ (no DP)" if math.isinf(budget) else f"{budget:g}"


def tradeoff_table(final_runs: pd.DataFrame) -> pd.DataFrame:
    """One row per budget: runs, the largest epsilon spent, mean and std over seeds of
    every plotted number, and the paired differences from no DP (mean, 95 % interval)."""
    table = with_budgets(final_runs)
    columns = [
        c
        for c in (SPENT, SYNTHETIC_ACCURACY, "quality-frechet-distance", FLAGGED, FLAGGED_CHANCE)
        if c in table
    ]
    columns += [c for c in (*AUC_ATTACKS, F1) if c in table]
    baseline = table[np.isinf(table[BUDGET])].set_index("seed")
    none = reference_runs(final_runs).set_index("seed")
    rows = []
    for budget in _budget_order(table):
        group = table[table[BUDGET] == budget]
        row: dict[str, float | str | int] = {BUDGET: budget_label(budget), "runs": len(group)}
        if SPENT in group and group[SPENT].notna().any():
            row["epsilon-spent-max"] = float(group[SPENT].max())
        for column in columns:
            if column == SPENT:
                continue
            row[f"{column}-mean"] = float(group[column].mean())
            row[f"{column}-std"] = float(group[column].std()) if len(group) > 1 else math.nan
        if not math.isinf(budget):
            for column in (c for c in PAIRED if c in table):
                _paired_into(row, column, group.set_index("seed")[column] - baseline[column])
        if not none.empty:
            _paired_into(row, VS_NONE, group.set_index("seed")[F1] - none[F1])
        rows.append(row)
    if not none.empty:
        reference = {BUDGET: NO_SYNTHETIC, "runs": len(none), f"{F1}-mean": none[F1].mean()}
        reference[f"{F1}-std"] = float(none[F1].std()) if len(none) > 1 else math.nan
        rows.append(reference)
    return _with_q(pd.DataFrame(rows))


def _with_q(table: pd.DataFrame) -> pd.DataFrame:
    """Each ``<name>-diff-p`` column's q value (``<name>-diff-q``), adjusted over every
    difference of the table: all budgets and all compared numbers are one family."""
    p_columns = [c for c in table if c.endswith("-diff-p")]
    if not p_columns:
        return table
    stacked = table[p_columns].stack()  # NaN where a row has no such difference: no test
    q = false_discovery_q(stacked).unstack()
    for column in p_columns:
        q_column = column.removesuffix("-p") + "-q"
        table[q_column] = q[column] if column in q else math.nan
    return table


def _paired_into(row: dict, name: str, pairs: pd.Series) -> None:
    """Mean, 95 % interval and n of paired differences, as ``<name>-diff-*`` columns."""
    differences = pairs.dropna()
    low, high = interval(differences.to_list())
    row[f"{name}-diff-mean"] = float(differences.mean()) if len(differences) else math.nan
    row[f"{name}-diff-low"], row[f"{name}-diff-high"] = low, high
    row[f"{name}-diff-n"] = len(differences)
    row[f"{name}-diff-p"] = p_value(differences.to_list())


def tradeoff_markdown(final_runs: pd.DataFrame) -> str:
    """The trade-off table as Markdown: mean ± std per budget, then the paired differences
    from no DP with their intervals and what they support."""
    table = tradeoff_table(final_runs)

    def cell(row: pd.Series, column: str, digits: int = 3) -> str:
        mean = row.get(f"{column}-mean")
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "–"
        std = row.get(f"{column}-std")
        spread = "" if std is None or math.isnan(std) else f" ± {std:.{digits}f}"
        return f"{mean:.{digits}f}{spread}"

    lines = [
        "| budget epsilon | runs | epsilon spent (max) | train-on-synthetic accuracy | "
        "Fréchet distance | flagged share (chance) | AUC loss | AUC nearest | "
        "client macro-F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _, row in table.iterrows():
        spent = row.get("epsilon-spent-max")
        flagged = cell(row, FLAGGED)
        chance = row.get(f"{FLAGGED_CHANCE}-mean")
        if chance is not None and not math.isnan(chance):
            flagged += f" ({chance:.3f})"
        lines.append(
            f"| {row[BUDGET]} | {row['runs']} | "
            f"{'–' if spent is None or math.isnan(spent) else f'{spent:.2f}'} | "
            f"{cell(row, SYNTHETIC_ACCURACY)} | {cell(row, 'quality-frechet-distance', 0)} | "
            f"{flagged} | {cell(row, 'privacy-auc-loss')} | "
            f"{cell(row, 'privacy-auc-generated-nearest')} | {cell(row, F1)} |"
        )
    compared = dict(PAIRED)
    if f"{VS_NONE}-diff-mean" in table:
        compared[VS_NONE] = f"client macro-F1 minus {NO_SYNTHETIC}"
    lines += [
        "",
        "Paired differences (same seed), mean and 95 % t interval: from the runs without DP"
        + (f"; in the last column from the runs with {NO_SYNTHETIC}" if VS_NONE in compared else "")
        + "; q: the paired t test's p value adjusted over every difference of this table "
        "(Benjamini-Hochberg):",
        "",
        "| budget epsilon | " + " | ".join(compared.values()) + " |",
        "| --- | " + " | ".join("---" for _ in compared) + " |",
    ]
    for _, row in table.iterrows():
        if row[BUDGET] == NO_SYNTHETIC or (row[BUDGET].startswith("∞") and VS_NONE not in compared):
            continue
        cells = " | ".join(_difference(row, column) for column in compared)
        lines.append(f"| {row[BUDGET]} | {cells} |")
    return "\n".join(lines) + "\n"


def _difference(row: pd.Series, name: str) -> str:
    mean = row.get(f"{name}-diff-mean")
    if mean is None or math.isnan(mean):
        return "–"
    low, high = row[f"{name}-diff-low"], row[f"{name}-diff-high"]
    span = "" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"
    q = row.get(f"{name}-diff-q", math.nan)
    adjusted = "" if pd.isna(q) else f", q {q_text(q)}"
    return f"{mean:+.3f}{span}, n={int(row[f'{name}-diff-n'])}{adjusted}: {direction(low, high)}"


def plot_privacy_tradeoff(final_runs: pd.DataFrame) -> Figure:
    """Four panels over the budgets (no DP on the left): generator quality, the audit's
    flagged share, the attacks' AUC, the clients' macro-F1; each seed as a dot, the mean
    ± 1 std as a bar, the reference levels dashed."""
    table = with_budgets(final_runs)
    budgets = _budget_order(table)
    position = {budget: i for i, budget in enumerate(budgets)}
    x = table[BUDGET].map(position)
    figure = Figure(figsize=(10, 7.5))
    axes = figure.subplots(2, 2, sharex=True)

    def series(axis, column: str, label: str, offset: float = 0.0, color: str = "C0") -> None:
        if column not in table:
            return
        axis.plot(x + offset, table[column], "o", color=color, alpha=0.35, markersize=4)
        grouped = table.groupby(BUDGET)[column]
        means, stds = grouped.mean(), grouped.std()
        xs = [position[b] + offset for b in means.index]
        axis.errorbar(xs, means, yerr=stds.fillna(0), fmt="s", color=color, capsize=4, label=label)

    def reference(axis, column: str, label: str) -> None:
        if column in table and table[column].notna().any():
            axis.axhline(table[column].mean(), color="grey", linestyle="--", label=label)

    quality, audit, attacks, scores = axes.flat
    series(quality, SYNTHETIC_ACCURACY, "trained on synthetic images")
    reference(quality, REAL_ACCURACY, "trained on real images (mean)")
    quality.set_title("generator: real-test accuracy of a classifier")
    series(audit, FLAGGED, "synthetic images flagged")
    reference(audit, FLAGGED_CHANCE, "chance (held-out reference, mean)")
    audit.set_title("memorization audit: flagged share")
    for i, (column, label) in enumerate(AUC_ATTACKS.items()):
        series(attacks, column, label, offset=(i - 0.5) * 0.12, color=f"C{i}")
    attacks.axhline(0.5, color="grey", linestyle="--", label="0.5: nothing learned")
    attacks.set_title("membership inference on the CVAE: AUC")
    series(scores, F1, "clients' final macro-F1")
    none = reference_runs(final_runs)
    if not none.empty:
        scores.axhline(none[F1].mean(), color="C2", linestyle="--", label=f"{NO_SYNTHETIC} (mean)")
    scores.set_title("classifier: client test macro-F1")
    for axis in axes.flat:
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xticks(range(len(budgets)), [budget_label(b) for b in budgets])
        axis.set_xlabel("the CVAE's sample-level DP budget epsilon")
    runs = table.groupby(BUDGET).size()
    figure.suptitle(
        "What DP for the CVAE costs and buys (n = "
        + ", ".join(f"{runs[b]}" for b in budgets)
        + " runs per budget, left to right)"
    )
    return figure
