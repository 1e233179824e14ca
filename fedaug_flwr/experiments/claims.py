"""The study's claims as numbers: paired differences over seeds, with 95 % intervals.

A seed fixes a run's partition and initial models, so runs of different cells
with the same seed differ only in what the cell changes. Every comparison is
therefore taken within a seed first (e.g. minority minus uniform, averaged
over betas and k) and then summarized over seeds as mean, sample std, n and a
95 % t interval of the mean difference. A verdict follows the interval: it
"agrees" with the study only when the interval excludes zero on the study's
side, "disagrees" when it excludes zero on the other side, and is
"inconclusive" when it covers zero (or n < 2).

Each table tests many comparisons at once, so some intervals exclude zero by chance
alone (about 1 in 20 where nothing differs). Every row also carries its paired t
test's p value and a q value: Benjamini-Hochberg's adjustment over the table's
comparisons (``scipy.stats.false_discovery_control``), which keeps the expected share
of chance findings among those with q < 0.05 at 5 % for independent or positively
dependent tests (a table's comparisons share seeds and runs, so it is a guide, not a
guarantee). A verdict stays with the interval; q says whether it survives the table's
multiplicity.

Where the study gives a number for a claim, on the metric it measured, the table
shows it beside ours (``STUDY_NUMBERS``), and :func:`study_levels` sets its final
macro-F1 levels next to our runs'. :func:`plot_claims` draws a claim set's tables as
a forest plot.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from fedaug_flwr.experiments.aggregate import (
    BETA,
    F1,
    IMPUTATION_MODES,
    LAST_ROUNDS,
    FigureError,
    K,
    imputation_curve,
    require_one_cell,
    require_one_cell_per_point,
)

# The metrics the study's figures plot (docs/study.md): its imputation figures (9-12)
# the global model's micro-F1 = accuracy, its finetune figure (15) the global macro-F1.
IMPUTATION_FIGURE_METRIC = "global-test-accuracy"
FINETUNE_FIGURE_METRIC = "global-test-macro-f1"

SAVED_OUTPUTS = "the authors' saved outputs, mean of 5 runs"
# A check of the imputation claims against one round's swing: the study's metric averaged
# over the classifier's last rounds (``aggregate.last_rounds_columns``).
LAST_ROUNDS_METRIC = f"{IMPUTATION_FIGURE_METRIC}-last{LAST_ROUNDS}"
LAST_ROUNDS_NOTE = (
    f"The same comparisons on the global accuracy averaged over the last {LAST_ROUNDS} "
    "classifier rounds: a check against the swing of the global model from one round to "
    "the next. The study reports the last round only, so its numbers are not repeated "
    "here; a verdict that holds on the last round but not here rests on that round.\n\n"
)

# The bn-recalibration-images diagnostic: the study's metric for the same global models
# with BatchNorm statistics measured anew (only where the runs recorded it).
RECALIBRATED_METRIC = "global-test-recalibrated-accuracy"
RECALIBRATED_NOTE = (
    "The same comparisons on the global accuracy of the same models with their BatchNorm "
    "statistics measured anew on real training images (run-config key "
    "bn-recalibration-images): whether a difference lies in the weights or in the "
    "statistics FedAvg averages. A diagnostic, not the study's metric, so its numbers are "
    "not repeated here.\n\n"
)

# The study's Figure 8 metric: the clients' test loss, averaged over clients (the
# study's code sums it over batches, ours is per image; docs/study.md).
TEST_LOSS_METRIC = "test-loss"
TEST_LOSS_NOTE = (
    'The study: "the mean test losses and their variances do not seem to be affected by '
    "the number of imputed data points\" (section 4.1, its Figure 8: the clients' test loss "
    'per round). So its sign here is 0, and an interval that excludes zero "differs"; a '
    "negative difference is a lower loss. On the final round's loss, the clients' mean "
    "(the study's Figure 8 metric) and the global model's on the test set.\n\n"
)

METRIC_NOTES = {
    LAST_ROUNDS_METRIC: LAST_ROUNDS_NOTE,
    RECALIBRATED_METRIC: RECALIBRATED_NOTE,
    TEST_LOSS_METRIC: TEST_LOSS_NOTE,
}

# The study's number for a comparison, on the metric above (what its text or its authors'
# saved outputs state; docs/study.md). Keys: (comparison, beta); beta None for an average
# over betas. Its imputation grid has no printed numbers, only these two from the text.
STUDY_NUMBERS: dict[tuple[str, float | None], tuple[float, str]] = {
    ("minority - uniform", None): (+0.015, "paper, section 5: 5 betas, k = 100, 500, 1000"),
    ("minority k = 1000 - no synthetic", 100.0): (+0.1, "paper, section 4.1: 'roughly 0.1'"),
    ("fine-tuned - vanilla", 0.1): (0.88934 - 0.86666, SAVED_OUTPUTS),
    ("fine-tuned - vanilla", 0.3): (0.92828 - 0.92416, SAVED_OUTPUTS),
    ("fine-tuned - vanilla", 0.5): (0.94674 - 0.96406, SAVED_OUTPUTS),
    ("fine-tuned - vanilla", 10.0): (0.95458 - 0.96339, SAVED_OUTPUTS),
    ("fine-tuned - vanilla", 100.0): (0.95124 - 0.96634, SAVED_OUTPUTS),
}

# The study's final global macro-F1 per beta (its authors' saved outputs; docs/study.md).
STUDY_LEVELS: dict[str, dict[float, float]] = {
    "vanilla FedAvg (k = 0)": {
        0.1: 0.86666,
        0.3: 0.92416,
        0.5: 0.96406,
        10.0: 0.96339,
        100.0: 0.96634,
    },
    "fine-tuned": {0.1: 0.88934, 0.3: 0.92828, 0.5: 0.94674, 10.0: 0.95458, 100.0: 0.95124},
}


# The study's grid (docs/study.md): an average over betas or k is its number only over these.
STUDY_BETAS = (0.1, 0.3, 0.5, 10.0, 100.0)
STUDY_KS = (100, 500, 1000)


def study_number(comparison: str, betas: Sequence[float]) -> tuple[float, str] | None:
    """The study's number for ``comparison`` over ``betas`` (one beta, or an average over
    several, which the study gives only over all of its five), or None."""
    if len(betas) > 1 and sorted(float(b) for b in betas) != list(STUDY_BETAS):
        return None  # a mean over other betas (e.g. a campaign's first) is another number
    key = (comparison, float(betas[0]) if len(betas) == 1 else None)
    return STUDY_NUMBERS.get(key)


def per_seed(final_runs: pd.DataFrame, mode: str, metric: str = F1) -> pd.DataFrame:
    """One row per seed, one column per (beta, k) of ``mode`` (k = 0: no synthetic images)."""
    curve = imputation_curve(final_runs, mode)
    require_one_cell_per_point(curve, "imputation claims")
    return curve.pivot_table(index="seed", columns=[BETA, K], values=metric)


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean of paired differences (NaN for fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def p_value(values: Sequence[float]) -> float:
    """The two-sided p value of the paired t test that the mean difference is zero (NaN
    for fewer than 2 values): below 0.05 exactly when :func:`interval` excludes zero."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan")
    if np.ptp(values) == 0:  # no spread: scipy's statistic is undefined, the interval a point
        return 1.0 if values[0] == 0 else 0.0
    with warnings.catch_warnings():  # near-equal differences: scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_1samp(values, 0.0).pvalue)


def false_discovery_q(p_values: pd.Series) -> pd.Series:
    """Benjamini-Hochberg q values over the finite ``p_values`` (NaN stays NaN): one
    table's comparisons adjusted for their number."""
    q = pd.Series(float("nan"), index=p_values.index)
    finite = p_values.notna()
    if finite.any():
        q[finite] = stats.false_discovery_control(p_values[finite].to_numpy(), method="bh")
    return q


def with_q(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (rows with a ``p`` column) with the q values of all of its rows."""
    return table.assign(q=false_discovery_q(table["p"])) if len(table) else table


def direction(low: float, high: float) -> str:
    """What a 95 % interval of a difference supports, with no claim to compare it with:
    ``higher`` / ``lower`` when it excludes zero, else ``inconclusive``."""
    if math.isnan(low):
        return "inconclusive (n < 2)"
    return "higher" if low > 0 else "lower" if high < 0 else "inconclusive"


def verdict(low: float, high: float, study_sign: int) -> str:
    """``agrees`` / ``disagrees`` with a study that found a difference of ``study_sign``
    (+1, -1), or ``inconclusive``; with ``study_sign`` 0 (the study found none):
    ``differs`` or ``inconclusive`` (an interval that covers zero does not show that
    there is no difference)."""
    if math.isnan(low):
        return "inconclusive (n < 2)"
    excludes_zero = low > 0 or high < 0
    if not excludes_zero:
        return "inconclusive"
    if study_sign == 0:
        return "differs"
    return "agrees" if (low > 0) == (study_sign > 0) else "disagrees"


def _summary(
    name: str,
    betas: Sequence[float],
    differences: pd.Series,
    study_sign: int | None = None,
    study: tuple[float, str] | None = None,
) -> dict:
    """One comparison's row; ``study`` is the study's number and its source, where the
    study states one on the metric compared."""
    values = differences.dropna()
    low, high = interval(values.to_numpy())
    return {
        "comparison": name,
        "betas": ", ".join(f"{b:g}" for b in betas),
        "mean": float(values.mean()) if len(values) else float("nan"),
        "std": float(values.std()) if len(values) > 1 else float("nan"),
        "n": int(len(values)),
        "ci-low": low,
        "ci-high": high,
        "p": p_value(values.to_numpy()),
        "study": {None: "", 1: "+", -1: "-", 0: "0"}[study_sign],
        "study-number": float("nan") if study is None else study[0],
        "study-source": "" if study is None else study[1],
        "verdict": "" if study_sign is None else verdict(low, high, study_sign),
    }


def _mean_over(table: pd.DataFrame, betas: Sequence[float], ks: Sequence[int]) -> pd.Series:
    """Mean over every (beta, k) of ``betas`` x ``ks``, per seed. A seed missing any of
    those cells gets NaN and does not count, also when no seed has the cell yet (no
    column at all): both sides of a difference then average the same cells."""
    columns = pd.MultiIndex.from_product([list(betas), list(ks)], names=table.columns.names)
    return table.reindex(columns=columns).mean(axis=1, skipna=False)


def _study_sign_against_none(mode: str, k: int, betas: Sequence[float]) -> int | None:
    """What the study found for k synthetic images against none (docs/study.md):
    minority helps at every k; uniform k = 100 helps at beta 0.1 and 0.3. Elsewhere it
    states no direction."""
    if mode == "minority":
        return +1
    if k == 100 and betas and all(b in (0.1, 0.3) for b in betas):
        return +1
    return None


def _imputation_grid(
    final_runs: pd.DataFrame, metric: str
) -> tuple[dict[str, pd.DataFrame], list[float], list[int], pd.Series]:
    """Per imputation mode with runs of its own, ``metric`` per seed and (beta, k); the
    betas, the k > 0 and each k's synthetic share of the training images."""
    for column in (BETA, K, "imputation", "seed", metric):
        if column not in final_runs:
            raise FigureError(f"imputation claims need column '{column}'")
    tables = {mode: per_seed(final_runs, mode, metric) for mode in IMPUTATION_MODES}
    # a mode without runs of its own has no claims; minority - uniform needs both
    tables = {m: t for m, t in tables.items() if (t.columns.get_level_values(K) > 0).any()}
    if not tables:
        raise FigureError("imputation claims need runs of uniform or minority imputation")
    betas = sorted(final_runs[BETA].unique())
    # every k that has runs, also where this metric has no value (n = 0 there): each
    # metric's table then has the same rows, which the forest plot's labels rely on
    curves = (imputation_curve(final_runs, mode) for mode in IMPUTATION_MODES)
    ks = sorted({int(k) for curve in curves for k in curve[K] if k > 0})
    share = final_runs.groupby(K)["synthetic-fraction"].mean()
    return tables, betas, ks, share


def _more_synthetic_rows(
    tables: dict[str, pd.DataFrame],
    betas: Sequence[float],
    ks: Sequence[int],
    share: pd.Series,
    sign_against_none: Callable[[str, int, Sequence[float]], int | None],
    sign_more: Callable[[str], int | None],
    study: Callable[[str, Sequence[float]], tuple[float, str] | None],
) -> list[dict]:
    """Per mode, for both betas together and each alone: every k against no synthetic
    images, and the largest k against the smallest; the study's sign of each from the
    two functions given."""
    rows = []
    beta_sets = [betas, *([b] for b in betas)] if len(betas) > 1 else [betas]
    for mode, table in tables.items():
        for beta_set in beta_sets:
            for k in ks:
                rows.append(
                    _summary(
                        f"{mode} k = {k} ({100 * share[k]:.0f}%) - no synthetic",
                        beta_set,
                        _mean_over(table, beta_set, [k]) - _mean_over(table, beta_set, [0]),
                        sign_against_none(mode, k, beta_set),
                        study(f"{mode} k = {k} - no synthetic", beta_set),
                    )
                )
            if len(ks) > 1:
                rows.append(
                    _summary(
                        f"{mode} k = {ks[-1]} - {mode} k = {ks[0]} (more synthetic)",
                        beta_set,
                        _mean_over(table, beta_set, [ks[-1]])
                        - _mean_over(table, beta_set, [ks[0]]),
                        sign_more(mode),
                    )
                )
    return rows


def imputation_claims(final_runs: pd.DataFrame, metric: str = F1) -> pd.DataFrame:
    """Differences in ``metric`` that the study's claims are about, per seed then over seeds."""
    tables, betas, ks, share = _imputation_grid(final_runs, metric)

    def study(comparison: str, beta_set: Sequence[float]) -> tuple[float, str] | None:
        if metric != IMPUTATION_FIGURE_METRIC:
            return None
        return study_number(comparison, beta_set)

    rows = []
    if len(tables) == len(IMPUTATION_MODES):  # minority - uniform
        rows.append(
            _summary(
                "minority - uniform, mean over betas and k > 0",
                betas,
                _mean_over(tables["minority"], betas, ks)
                - _mean_over(tables["uniform"], betas, ks),
                +1,  # the study: +0.015 on average
                # its number averages k = 100, 500, 1000: not a number for other k
                study("minority - uniform", betas) if tuple(ks) == STUDY_KS else None,
            )
        )
        for k in ks:
            rows.append(
                _summary(
                    f"minority - uniform at k = {k} ({100 * share[k]:.0f}% synthetic)",
                    betas,
                    _mean_over(tables["minority"], betas, [k])
                    - _mean_over(tables["uniform"], betas, [k]),
                    +1 if k in STUDY_KS and k != 100 else None,  # "at every k except 100"
                )
            )
    rows += _more_synthetic_rows(
        tables,
        betas,
        ks,
        share,
        _study_sign_against_none,
        # uniform degrades past ~45 % synthetic; minority keeps improving
        lambda mode: -1 if mode == "uniform" else +1,
        study,
    )
    return with_q(pd.DataFrame(rows))


def test_loss_claims(final_runs: pd.DataFrame, metric: str = TEST_LOSS_METRIC) -> pd.DataFrame:
    """The study's "mean test losses ... do not seem to be affected by the number of
    imputed data points" (section 4.1, Figure 8) as differences in ``metric``: each k
    against none and more against fewer synthetic images, where the study found no
    difference, so an interval that excludes zero "differs"."""
    tables, betas, ks, share = _imputation_grid(final_runs, metric)

    def no_difference(*_: object) -> int:
        return 0

    rows = _more_synthetic_rows(
        tables, betas, ks, share, no_difference, no_difference, lambda *_: None
    )
    return with_q(pd.DataFrame(rows))


def _without_synthetic_images(final_runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that add no synthetic images (vanilla, pretrained, fine-tuned)."""
    return final_runs[(final_runs["imputation"] == "none") | (final_runs[K] == 0)]


def finetune_claims(final_runs: pd.DataFrame, metric: str = F1) -> pd.DataFrame:
    """Per beta, paired by seed: fine-tuned - vanilla (the study: better at beta 0.1 and
    0.3, comparable elsewhere) and pretrained - vanilla (the study: worse)."""
    needed = [BETA, K, "imputation", "pretrain", "seed", metric, f"pretrained-{metric}"]
    missing = [c for c in needed if c not in final_runs]
    if missing:
        raise FigureError(f"finetune claims need column(s) {missing}")
    plain = _without_synthetic_images(final_runs)
    rows = []
    for beta in sorted(plain[BETA].unique()):
        at = plain[np.isclose(plain[BETA], beta)]
        vanilla = at[at["pretrain"] == "off"].set_index("seed")[metric]
        tuned = at[at["pretrain"] == "federated"].set_index("seed")
        if vanilla.empty or tuned.empty:
            continue
        for arm in ("off", "federated"):
            require_one_cell(at[at["pretrain"] == arm], f"finetune claims, beta={beta:g}")
        rows.append(
            _summary(
                "fine-tuned - vanilla",
                [beta],
                (tuned[metric] - vanilla).dropna(),
                +1 if beta in (0.1, 0.3) else 0,
                study_number("fine-tuned - vanilla", [beta])
                if metric == FINETUNE_FIGURE_METRIC
                else None,
            )
        )
        rows.append(
            _summary(
                "pretrained only - vanilla",
                [beta],
                (tuned[f"pretrained-{metric}"] - vanilla).dropna(),
                -1,
            )
        )
    if not rows:
        raise FigureError("finetune claims need vanilla and pretrained runs of one beta")
    return with_q(pd.DataFrame(rows))


def inside(value: float, low: float, high: float) -> str:
    """Whether the study's ``value`` lies in our interval: ``yes`` / ``no``; ``-`` without
    an interval (n < 2), empty without a study value."""
    if pd.isna(value):
        return ""
    if pd.isna(low):
        return "-"
    return "yes" if low <= value <= high else "no"


def q_text(q: float) -> str:
    """A q value for a table: ``-`` where there is none (n < 2)."""
    return "-" if pd.isna(q) else f"{q:.3f}" if q >= 0.001 else "< 0.001"


def claims_markdown(table: pd.DataFrame, metric: str) -> str:
    """A claims table (:func:`imputation_claims`, :func:`finetune_claims`) as Markdown."""
    lines = [
        f"| comparison ({metric}, paired by seed) | beta | mean | std | n | 95 % interval "
        "| q | study | study's number | study's number in our interval | verdict |",
        "|---|---:|---:|---:|---:|---|---:|---|---|---|---|",
    ]
    for row in table.to_dict("records"):
        mean = "-" if pd.isna(row["mean"]) else f"{row['mean']:+.4f}"
        std = "-" if pd.isna(row["std"]) else f"{row['std']:.4f}"
        ci = "-" if pd.isna(row["ci-low"]) else f"[{row['ci-low']:+.4f}, {row['ci-high']:+.4f}]"
        number = row.get("study-number", float("nan"))
        cited = "" if pd.isna(number) else f"{number:+.4f} ({row['study-source']})"
        within = inside(number, row["ci-low"], row["ci-high"])
        lines.append(
            f"| {row['comparison']} | {row['betas']} | {mean} | {std} | {row['n']} "
            f"| {ci} | {q_text(row['q'])} | {row['study']} | {cited} | {within} "
            f"| {row['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def study_levels(final_runs: pd.DataFrame) -> pd.DataFrame:
    """Per beta the study gives: its final global macro-F1 for vanilla FedAvg and for the
    fine-tuned model next to ours (mean, std, n and the 95 % t interval of the mean over
    seeds) where we have such runs."""
    metric = FINETUNE_FIGURE_METRIC
    if metric not in final_runs or BETA not in final_runs:
        raise FigureError(f"the study's levels need column '{metric}'")
    plain = _without_synthetic_images(final_runs)
    pretrain = plain["pretrain"] if "pretrain" in plain else pd.Series("off", plain.index)
    arms = {"vanilla FedAvg (k = 0)": pretrain == "off", "fine-tuned": pretrain == "federated"}
    rows = []
    for arm, study_by_beta in STUDY_LEVELS.items():
        for beta, study_value in study_by_beta.items():
            runs = plain[arms[arm] & np.isclose(plain[BETA], beta)]
            ours = runs[metric].dropna()
            if ours.empty:
                continue
            require_one_cell(runs, f"the study's levels, {arm}, beta={beta:g}")
            low, high = interval(ours.to_numpy())
            rows.append(
                {
                    "model": arm,
                    "beta": beta,
                    "study": study_value,
                    "mean": float(ours.mean()),
                    "std": float(ours.std()) if len(ours) > 1 else float("nan"),
                    "n": int(len(ours)),
                    "ci-low": low,
                    "ci-high": high,
                }
            )
    if not rows:
        raise FigureError("no run has a beta and model the study gives a level for")
    return pd.DataFrame(rows)


def study_levels_markdown(table: pd.DataFrame) -> str:
    """:func:`study_levels` as Markdown."""
    lines = [
        f"| model | beta | study ({SAVED_OUTPUTS}) | ours: mean | std | n | 95 % interval "
        "| ours - study | study's level in our interval |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in table.to_dict("records"):
        std = "-" if pd.isna(row["std"]) else f"{row['std']:.4f}"
        ci = "-" if pd.isna(row["ci-low"]) else f"[{row['ci-low']:.4f}, {row['ci-high']:.4f}]"
        within = inside(row["study"], row["ci-low"], row["ci-high"])
        lines.append(
            f"| {row['model']} | {row['beta']:g} | {row['study']:.4f} | {row['mean']:.4f} "
            f"| {std} | {row['n']} | {ci} | {row['mean'] - row['study']:+.4f} | {within} |"
        )
    return "\n".join(lines) + "\n"


# The claim sets of the report and the metrics each is computed on.
CLAIM_SETS = (
    (
        "Imputation",
        imputation_claims,
        (F1, IMPUTATION_FIGURE_METRIC, LAST_ROUNDS_METRIC, RECALIBRATED_METRIC),
    ),
    ("Test loss", test_loss_claims, (TEST_LOSS_METRIC, "global-test-loss")),
    ("Fine-tuning", finetune_claims, (F1, FINETUNE_FIGURE_METRIC)),
)


def claim_tables(
    final_runs: pd.DataFrame, why_not: dict[str, str] | None = None
) -> dict[str, dict[str, pd.DataFrame]]:
    """Every claims table the runs support: ``{"Imputation": {metric: table}, ...}``, a set
    or metric left out where its runs or columns are missing; ``why_not`` (if given)
    gets, per set without any table, the reason its first metric gave."""
    found: dict[str, dict[str, pd.DataFrame]] = {}
    for title, build, metrics in CLAIM_SETS:
        tables, reasons = {}, []
        for metric in metrics:
            try:
                tables[metric] = build(final_runs, metric)
            except (FigureError, KeyError) as error:
                reasons.append(str(error).strip("'\""))
        if tables:
            found[title] = tables
        elif why_not is not None:
            why_not[title] = reasons[0]
    return found


def claims_report(final_runs: pd.DataFrame) -> str:
    """Every claim the runs support, on the clients' macro-F1 and on the metric the
    study's figures plot (global accuracy for imputation, global macro-F1 for the
    finetune comparison)."""
    sections = []
    for title, tables in claim_tables(final_runs).items():
        for metric, table in tables.items():
            note = METRIC_NOTES.get(metric, "")
            sections.append(f"## {title}: {metric}\n\n{note}{claims_markdown(table, metric)}")
    try:
        levels = study_levels(final_runs)
    except (FigureError, KeyError):
        pass
    else:
        sections.append(
            f"## The study's levels: {FINETUNE_FIGURE_METRIC} of the final global model\n\n"
            f"{study_levels_markdown(levels)}"
        )
    if not sections:
        raise FigureError("no claim can be computed from these runs yet")
    legend = (
        "Paired by seed; 95 % t interval of the mean difference. study: the sign the "
        "study reports (0: no difference). study's number: the difference the study "
        "states, where it states one, on the metric it measured (global accuracy for "
        "imputation, global macro-F1 for fine-tuning), with its source, and whether it lies "
        "in our 95 % interval (- : no interval yet, n < 2). verdict: agrees / disagrees "
        "(differs, where the study found no difference) only when the interval excludes "
        "zero; otherwise inconclusive. q: the paired t test's p value adjusted over the "
        "table's comparisons (Benjamini-Hochberg); an interval that excludes zero with "
        "q >= 0.05 may be one of the chance findings expected among so many comparisons. "
        "Comparisons without an interval yet (n < 2) are not in the family, so the family "
        "and with it q change as seeds arrive.\n\n"
    )
    return legend + "\n".join(sections)


# The forest plot's colours: what an interval supports.
OUTCOME_COLOURS = {
    "agrees": "tab:green",
    "disagrees": "tab:red",
    "differs": "tab:red",
    "excludes zero": "tab:blue",  # no claim of the study to compare with
    "covers zero": "tab:gray",
}
# Differences of F1 or accuracy beyond this are not drawn to scale: an interval of two
# seeds can span more than the metric's whole range.
PLOT_LIMIT = 0.5


def _outcome(row: dict) -> str:
    if row["n"] < 2 or not (row["ci-low"] > 0 or row["ci-high"] < 0):
        return "covers zero"
    return row["verdict"] if row["verdict"] in OUTCOME_COLOURS else "excludes zero"


def plot_claims(tables: dict[str, pd.DataFrame], title: str) -> Figure:
    """A forest plot of one claim set (:func:`claim_tables`), one panel per metric: each
    comparison's mean paired difference with its 95 % interval, coloured by what the
    interval supports; filled where q < 0.05, open where not; a cross for one seed.
    The study's sign stands in the row's label."""
    if not tables:
        raise FigureError(f"{title} claims: no table to draw")
    first = next(iter(tables.values()))
    labels = [
        f"{row['comparison']}, beta {row['betas']}"
        + (f"  [study: {row['study']}]" if row["study"] else "")
        for row in first.to_dict("records")
    ]
    figure = Figure(
        figsize=(3.2 * len(tables) + 5.0, 0.26 * len(labels) + 2.0), layout="constrained"
    )
    axes = figure.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    keys = ["comparison", "betas"]
    for axis, (metric, table) in zip(axes, tables.items(), strict=True):
        if not table[keys].reset_index(drop=True).equals(first[keys].reset_index(drop=True)):
            raise FigureError(f"{title} claims: the metrics' tables have different rows")
        axis.axvline(0.0, color="black", linewidth=0.8)
        for i, row in enumerate(table.to_dict("records")):
            if row["n"] == 0:
                continue
            mean = float(np.clip(row["mean"], -PLOT_LIMIT, PLOT_LIMIT))
            if row["n"] < 2:
                axis.plot(mean, i, "x", color="tab:gray", markersize=5)
                continue
            colour = OUTCOME_COLOURS[_outcome(row)]
            low, high = (
                float(np.clip(v, -PLOT_LIMIT, PLOT_LIMIT)) for v in (row["ci-low"], row["ci-high"])
            )
            axis.plot([low, high], [i, i], color=colour, linewidth=1.5)
            for end, bound, marker in ((low, row["ci-low"], "<"), (high, row["ci-high"], ">")):
                if abs(bound) > PLOT_LIMIT:  # the interval goes on past the axis
                    axis.plot(end, i, marker, color=colour, markersize=4)
            filled = pd.notna(row["q"]) and row["q"] < 0.05
            axis.plot(
                mean,
                i,
                "o",
                color=colour,
                markersize=5,
                markerfacecolor=colour if filled else "white",
            )
        axis.set_xlim(-PLOT_LIMIT * 1.05, PLOT_LIMIT * 1.05)
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("difference, paired by seed")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].invert_yaxis()
    names = {"disagrees": "disagrees / differs"}
    handles = [
        Line2D([], [], color=c, marker="o", linestyle="-", label=names.get(name, name))
        for name, c in OUTCOME_COLOURS.items()
        if name != "differs"
    ] + [Line2D([], [], color="tab:gray", marker="x", linestyle="", label="one seed")]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
    figure.suptitle(
        f"{title}: mean difference and 95 % interval (filled: q < 0.05 over the table)",
        fontsize=10,
    )
    return figure
