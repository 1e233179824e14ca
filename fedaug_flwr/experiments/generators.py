"""Generator quality of a sweep's CVAEs, one row per CVAE, beside the real-image reference.

Every run that trained a CVAE checks it (``summary.json``'s ``generator-quality``, read
into ``final_runs.csv``'s ``quality-*`` columns): an ExquisiteNet trained on synthetic
images, scored on the real test set, against the same classifier trained on as many
real images (the reference), plus the Fréchet distance and per-class coverage in that
reference's features.

Runs that differ only in what the classifier phase does with the synthetic images
(imputation mode, k, pretraining, the classifier's strategy) train the same CVAE: same
seed, beta and CVAE settings. They are one row here, so that a CVAE shared by five
cells is not counted five times in the summary over seeds. Where their numbers differ
(runs made by different versions of the check or the CVAE), the row shows the range and
the summary over seeds takes their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedaug_flwr.experiments.aggregate import BETA, MODE, FigureError, K, over_seeds

# What the classifier phase does with a CVAE (the cell's name aside): runs whose keys
# differ only in these (how many images are imputed and when, the classifier's keys, its
# strategy's, pretraining's and fine-tuning's) share it.
# The synthetic images' own keys (e.g. ``synthetic-binarize``) are not among them: the
# check scores the images they make.
CLASSIFIER_ONLY = ("cell", MODE, K, "minority-rounding", "synthetic-refresh")
CLASSIFIER_ONLY_PREFIXES = ("clf-", "proximal-", "pretrain", "finetune-")
# The classifier's keys the check itself trains with (server_work.check_generator_quality):
# runs that differ in one share a CVAE but not the check's numbers, so they are not one row.
CHECK_KEYS = ("clf-lr", "clf-weight-decay", "clf-batch-size")


def trains_the_cvae(key: str) -> bool:
    """Whether a run's key can change its CVAE or its check (every key that is not the
    classifier's, and the classifier's keys the check trains with)."""
    if key in CHECK_KEYS:
        return True
    return key not in CLASSIFIER_ONLY and not key.startswith(CLASSIFIER_ONLY_PREFIXES)


SYNTHETIC, REAL = "quality-synthetic-accuracy", "quality-real-accuracy"
# (column, header, format) of the table, in order.
COLUMNS = (
    (SYNTHETIC, "trained on synthetic: real-test accuracy", "{:.3f}"),
    (REAL, "trained on real (reference)", "{:.3f}"),
    ("quality-gap-accuracy", "gap", "{:.3f}"),
    ("quality-synthetic-macro-f1", "trained on synthetic: macro-F1", "{:.3f}"),
    ("quality-frechet-distance", "Fréchet distance", "{:.1f}"),
    ("quality-coverage", "coverage", "{:.2f}"),
)


def run_id_columns(final_runs: pd.DataFrame) -> list[str]:
    """The columns naming a run (``final_runs.csv`` puts them first, ``seed`` last)."""
    if "seed" not in final_runs:
        raise FigureError("generator quality: the table has no 'seed' column")
    return list(final_runs.columns[: list(final_runs.columns).index("seed") + 1])


def cvae_quality(final_runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per CVAE: its key columns, ``runs`` (how many runs share it), and per
    quality column the mean, min and max over those runs; and the key columns."""
    if SYNTHETIC not in final_runs:
        raise FigureError("generator quality: no run checked a CVAE (no quality columns)")
    checked = final_runs[final_runs[SYNTHETIC].notna()]
    if checked.empty:
        raise FigureError("generator quality: no run checked a CVAE")
    keys = [c for c in run_id_columns(final_runs) if trains_the_cvae(c)]
    metrics = [c for c, _, _ in COLUMNS if c in checked]
    grouped = checked.groupby(keys, dropna=False, sort=True)
    table = grouped[metrics].agg(["mean", "min", "max"])
    table.columns = [f"{metric}-{stat}" for metric, stat in table.columns]
    table.insert(0, "runs", grouped.size())
    return table.reset_index(), keys


def _value(row: pd.Series, metric: str, fmt: str) -> str:
    low, high = row[f"{metric}-min"], row[f"{metric}-max"]
    if pd.isna(low):
        return "-"
    if np.isclose(low, high, rtol=0, atol=1e-9):
        return fmt.format(low)
    return f"{fmt.format(low)} to {fmt.format(high)}"


def _over_seeds(per_cvae: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, std and n over seeds of each CVAE's (mean) check, per group of the other keys."""
    means = {f"{c}-mean": c for c, _, _ in COLUMNS if f"{c}-mean" in per_cvae}
    checks = per_cvae[[*keys, *means]].rename(columns=means)
    return over_seeds(checks, [k for k in keys if k != "seed"])


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines, every column right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _shown_keys(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Beta and seed always; any other key only where it varies."""
    return [k for k in keys if k in (BETA, "seed") or table[k].nunique(dropna=False) > 1]


def generator_quality_markdown(final_runs: pd.DataFrame) -> str:
    """Per CVAE, then per beta over seeds: the check's numbers next to the reference."""
    per_cvae, keys = cvae_quality(final_runs)
    columns = [(c, h, f) for c, h, f in COLUMNS if f"{c}-mean" in per_cvae]
    shown = _shown_keys(per_cvae, keys)
    lines = [
        "# Generator quality of the CVAEs",
        "",
        "An ExquisiteNet trained on each CVAE's synthetic images and scored on the real test "
        "set, beside the same classifier trained with the same budget on real images of the "
        "run's training pool (the reference); gap = reference - synthetic. Fréchet distance "
        "and coverage (share of real test images whose ball of 5 nearest real neighbours "
        "holds a synthetic image, per class, mean over classes) in that reference's "
        "features. Runs that differ only in what the classifier does with the synthetic "
        "images share a CVAE and are one row; where their numbers differ (runs made by "
        "different code), the row shows the range.",
        "",
        "## Per CVAE",
        "",
    ]
    rows = [
        [_key(row[k]) for k in shown]
        + [str(int(row["runs"]))]
        + [_value(row, c, f) for c, _, f in columns]
        for _, row in per_cvae.iterrows()
    ]
    lines += _markdown_table([*shown, "runs", *(h for _, h, _ in columns)], rows)
    summary = _over_seeds(per_cvae, keys)
    summary_keys = [k for k in shown if k != "seed"]
    rows = []
    for _, row in summary.iterrows():
        cells = [_key(row[k]) for k in summary_keys] + [str(int(row["n"]))]
        for column, _, fmt in columns:
            mean, std = row[f"{column}-mean"], row[f"{column}-std"]
            text = "-" if pd.isna(mean) else fmt.format(mean)
            cells.append(text if pd.isna(std) else f"{text} +- {fmt.format(std)}")
        rows.append(cells)
    lines += [
        "",
        "## Over seeds (mean +- std over the CVAEs of each seed)",
        "",
        *_markdown_table([*summary_keys, "seeds", *(h for _, h, _ in columns)], rows),
    ]
    return "\n".join(lines) + "\n"


def _key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_generator_quality(final_runs: pd.DataFrame) -> Figure:
    """Real-test accuracy of the classifier trained on each CVAE's images and of its
    real-image reference, per beta: one point per seed, a bar at the mean."""
    per_cvae, _ = cvae_quality(final_runs)
    if BETA not in per_cvae:
        raise FigureError("generator quality figure: the runs have no beta")
    betas = sorted(per_cvae[BETA].unique())
    figure = Figure(figsize=(1.6 * len(betas) + 2.5, 3.6))
    axis = figure.subplots()
    width = 0.36
    for offset, (column, label, color) in enumerate(
        (
            (SYNTHETIC, "trained on synthetic images", "tab:orange"),
            (REAL, "trained on real images (reference)", "tab:blue"),
        )
    ):
        for position, beta in enumerate(betas):
            values = per_cvae[np.isclose(per_cvae[BETA], beta)][f"{column}-mean"].dropna()
            x = position + (offset - 0.5) * width
            axis.bar(
                x,
                values.mean(),
                width,
                color=color,
                alpha=0.35,
                label=label if position == 0 else None,
            )
            axis.plot(np.full(len(values), x), values, "o", color=color, ms=4)
    axis.set_xticks(range(len(betas)), [f"beta = {b:g}" for b in betas])
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy on the real test set")
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
    figure.suptitle(
        "Generator quality: a classifier trained on each CVAE's images\n"
        "(bar: mean over seeds; dots: one per seed)",
        fontsize=10,
    )
    return figure
