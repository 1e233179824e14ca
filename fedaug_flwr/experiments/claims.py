"""The study's imputation claims as numbers: paired differences of macro-F1 over seeds.

A seed fixes a run's partition and initial models, so runs of different cells
with the same seed differ only in what the cell changes. Every comparison is
therefore taken within a seed first (e.g. minority minus uniform, averaged
over betas and k) and then summarized over seeds as mean, sample std and n.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from fedaug_flwr.experiments.aggregate import (
    BETA,
    F1,
    IMPUTATION_MODES,
    FigureError,
    K,
    imputation_curve,
)


def per_seed(final_runs: pd.DataFrame, mode: str, metric: str = F1) -> pd.DataFrame:
    """One row per seed, one column per (beta, k) of ``mode`` (k = 0: no synthetic images)."""
    return imputation_curve(final_runs, mode).pivot_table(
        index="seed", columns=[BETA, K], values=metric
    )


def _summary(name: str, betas: Sequence[float], differences: pd.Series) -> dict:
    values = differences.dropna()
    return {
        "comparison": name,
        "betas": ", ".join(f"{b:g}" for b in betas),
        "mean": float(values.mean()) if len(values) else float("nan"),
        "std": float(values.std()) if len(values) > 1 else float("nan"),
        "n": int(len(values)),
    }


def _mean_over(table: pd.DataFrame, betas: Sequence[float], k: int | None) -> pd.Series:
    """Mean over the given betas (and one k, or every k > 0), per seed."""
    columns = [
        (beta, kk)
        for beta, kk in table.columns
        if beta in betas and (kk == k if k is not None else kk > 0)
    ]
    return table[columns].mean(axis=1, skipna=False)  # a seed missing a cell does not count


def imputation_claims(final_runs: pd.DataFrame, metric: str = F1) -> pd.DataFrame:
    """Differences in ``metric`` that the study's claims are about, per seed then over seeds."""
    for column in (BETA, K, "imputation", "seed", metric):
        if column not in final_runs:
            raise FigureError(f"imputation claims need column '{column}'")
    tables = {mode: per_seed(final_runs, mode, metric) for mode in IMPUTATION_MODES}
    if any(not (table.columns.get_level_values(K) > 0).any() for table in tables.values()):
        raise FigureError("imputation claims need runs of both uniform and minority imputation")
    betas = sorted(final_runs[BETA].unique())
    ks = sorted(k for k in tables["uniform"].columns.get_level_values(K).unique() if k > 0)
    share = final_runs.groupby(K)["synthetic-fraction"].mean()
    rows = [
        _summary(
            "minority - uniform, mean over betas and k > 0",
            betas,
            _mean_over(tables["minority"], betas, None)
            - _mean_over(tables["uniform"], betas, None),
        )
    ]
    for k in ks:
        rows.append(
            _summary(
                f"minority - uniform at k = {k} ({100 * share[k]:.0f}% synthetic)",
                betas,
                _mean_over(tables["minority"], betas, k) - _mean_over(tables["uniform"], betas, k),
            )
        )
    beta_sets = [betas, *([b] for b in betas)] if len(betas) > 1 else [betas]
    for mode in IMPUTATION_MODES:
        table = tables[mode]
        for beta_set in beta_sets:
            for k in ks:
                rows.append(
                    _summary(
                        f"{mode} k = {k} ({100 * share[k]:.0f}%) - no synthetic",
                        beta_set,
                        _mean_over(table, beta_set, k) - _mean_over(table, beta_set, 0),
                    )
                )
            if len(ks) > 1:
                rows.append(
                    _summary(
                        f"{mode} k = {ks[-1]} - {mode} k = {ks[0]} (more synthetic)",
                        beta_set,
                        _mean_over(table, beta_set, ks[-1]) - _mean_over(table, beta_set, ks[0]),
                    )
                )
    return pd.DataFrame(rows)


def claims_markdown(final_runs: pd.DataFrame, metric: str = F1) -> str:
    """:func:`imputation_claims` as a Markdown table (differences of ``metric``)."""
    table = imputation_claims(final_runs, metric)
    lines = [
        f"| comparison ({metric}, paired by seed) | beta | mean | std | n |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        std = "-" if pd.isna(row.std) else f"{row.std:.4f}"
        lines.append(f"| {row.comparison} | {row.betas} | {row.mean:+.4f} | {std} | {row.n} |")
    return "\n".join(lines) + "\n"
