"""Wall time of the study's full grid, estimated from the measured benchmarks.

The grid (docs/study.md): 5 Dirichlet betas x 5 seeds x
{k = 0, and k in (100, 500, 1000) x (uniform, minority)} = 175 runs of 100
clients on full MNIST, 15 CVAE rounds (none when k = 0) and 15 classifier
rounds each. From the measurements at 100 clients on full MNIST:

- a classifier round = its non-training part (evaluation, aggregation,
  transport) + the clients' training images / the training throughput
  measured in the round's ``train`` part (k changes only the images);
- a CVAE phase = its measured cold first round (actors start) + 14 times the
  median of the later, warm rounds;
- per run, the rest (SuperLink and Ray start, data, imputation, the
  generator-quality check, final evaluation) = the whole ``flwr run`` of
  ``bench.memory`` minus its rounds.

    python -m bench.grid_estimate

From whole runs instead (``--whole-runs``): the ``summary.json`` of completed runs
(a run folder's, or a campaign's compact one), e.g. a paper-scale run made on a GPU
by ``bench.gpu_check``. A grid k that was measured takes the mean total of its
runs (``timing-s.total``). Any other k is scaled from the measured run with the
nearest k (one with a CVAE, k > 0, for a k > 0): its classifier rounds' ``train``
part scales with the training images per round (real training images + clients x k),
everything else stays; for k = 0 the CVAE, generator-quality and imputation phases
are dropped. A k > 0 cannot be estimated from k = 0 runs alone (no CVAE measured).
The runs' own preset, clients and rounds are those of the estimate (the study's grid
needs 100 clients, 15 + 15 rounds; the table says what was measured).

    python -m bench.grid_estimate --whole-runs <run>/summary.json --machine "NVIDIA H200"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import RESULTS_DIR, print_table, read_json, save_results

BETAS, SEEDS, ROUNDS = 5, 5, 15
GRID = [(0, BETAS * SEEDS)] + [(k, 2 * BETAS * SEEDS) for k in (100, 500, 1000)]
CLIENTS = 100


def scale_result(path: Path, scale: str) -> dict:
    for result in read_json(path)["results"]:
        if result["scale"] == scale:
            return result
    raise SystemExit(f"{path} has no result for {scale}; run the benchmark first")


def whole_run(summary: dict, source: str = "") -> dict:
    """What the estimate needs of one completed run's ``summary.json``."""
    config, timing, data = summary["config"], summary["timing-s"], summary["data"]
    k = 0 if config["imputation"] == "none" else int(config["num-synthetic"])
    clients = int(data["num-clients"])
    train_fraction = 1.0 - float(config["val-fraction"]) - float(config["test-fraction"])
    rounds = (summary.get("classifier") or {}).get("round-timing-s", [])
    return {
        "source": source,
        "k": k,
        "clients": clients,
        "cvae-rounds": config["cvae-rounds"] if k else 0,
        "clf-rounds": config["clf-rounds"],
        "preset": (summary.get("study-preset") or {}).get("name", "unknown"),
        "total-s": float(timing["total"]),
        "classifier-train-s": sum(float(r.get("train", 0.0)) for r in rounds),
        "cvae-side-s": sum(
            float(timing.get(phase, 0.0)) for phase in ("cvae", "generator-quality", "imputation")
        ),
        # every client trains every round (fraction-train 1) on its split's training part
        "real-train-images": round(int(data["pool-size"]) * train_fraction),
    }


def estimate_from_runs(runs: Sequence[dict], grid: Sequence[tuple[int, int]] = GRID) -> list[dict]:
    """One row per grid k: measured (mean of its runs) or scaled from the nearest run."""
    rows = []
    for k, count in grid:
        same = [r for r in runs if r["k"] == k]
        usable = [r for r in runs if k == 0 or r["k"] > 0]
        if same:
            run_s, basis = sum(r["total-s"] for r in same) / len(same), f"measured ({len(same)})"
        elif usable:
            base = min(usable, key=lambda r: abs(r["k"] - k))
            images = base["real-train-images"] + base["clients"] * k
            base_images = base["real-train-images"] + base["clients"] * base["k"]
            train_s = base["classifier-train-s"] * images / base_images
            run_s = base["total-s"] - base["classifier-train-s"] + train_s
            if k == 0 and base["k"] > 0:
                run_s -= base["cvae-side-s"]
            basis = f"scaled from k = {base['k']}"
        else:
            rows.append({"k": k, "runs": count, "basis": "no run with a CVAE measured"})
            continue
        rows.append(
            {
                "k": k,
                "runs": count,
                "basis": basis,
                "run min": round(run_s / 60, 1),
                "runs h": round(count * run_s / 3600, 1),
            }
        )
    return rows


def main_whole_runs(paths: Sequence[str], output: str, machine: str) -> int:
    runs = [whole_run(read_json(Path(path)), str(path)) for path in paths]
    rows = estimate_from_runs(runs)
    known = [row for row in rows if "runs h" in row]
    hours = round(sum(row["runs h"] for row in known), 1) if len(known) == len(rows) else None
    shape = sorted({(r["clients"], r["cvae-rounds"], r["clf-rounds"], r["preset"]) for r in runs})
    print_table(
        f"estimated run time per grid cell, from whole runs ({machine})", rows, list(rows[0])
    )
    print(f"measured runs (clients, CVAE rounds, classifier rounds, preset): {shape}")
    print(f"full grid of {sum(r for _, r in GRID)} runs ~ {hours} h")
    save_results(
        output,
        {
            "benchmark": "grid-estimate-whole-runs",
            "machine": machine,
            "grid": GRID,
            "rows": rows,
            "grid-hours": hours,
            "runs": runs,
        },
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.grid_estimate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--whole-runs",
        nargs="+",
        metavar="SUMMARY",
        help="summary.json files of completed runs: estimate from them (other inputs unused)",
    )
    parser.add_argument("--classifier", default=str(RESULTS_DIR / "classifier.json"))
    parser.add_argument("--cvae", default=str(RESULTS_DIR / "cvae.json"))
    parser.add_argument("--memory", default=str(RESULTS_DIR / "memory.json"))
    parser.add_argument("--output", default=str(RESULTS_DIR / "grid-estimate.json"))
    parser.add_argument(
        "--machine", default="this CPU", help="what measured --classifier and --cvae (table title)"
    )
    args = parser.parse_args(argv)
    if args.whole_runs:
        output = args.output
        if output == parser.get_default("output"):
            output = str(RESULTS_DIR / "grid-estimate-whole-runs.json")
        return main_whole_runs(args.whole_runs, output, args.machine)
    classifier = scale_result(Path(args.classifier), "100:mnist")
    cvae = scale_result(Path(args.cvae), "100:mnist")
    whole_run = read_json(Path(args.memory))
    synthetic_in_measurement = whole_run["run-config"]["num-synthetic"]

    clf, cv = classifier["flower"], cvae["flower"]
    parts = clf["parts-median-s"]
    images = clf["train-images-per-round"]
    real_images = images - CLIENTS * synthetic_in_measurement
    train_throughput = images / parts["train"]  # images per second in the train part
    rest_of_round = clf["seconds-per-round"] - parts["train"]
    first_rounds = sorted(cvae["first-round-s"]["flower"])
    # Warm rounds only: with 2 measured rounds (the GPU preset) the median is the cold one's half.
    warm_rounds = sorted(
        r["parts"]["total"] for run in cvae["runs"]["flower"] for r in run["rounds"][1:]
    )
    warm_round = warm_rounds[len(warm_rounds) // 2] if warm_rounds else cv["seconds-per-round"]
    cvae_phase = first_rounds[len(first_rounds) // 2] + (ROUNDS - 1) * warm_round
    timing = whole_run["phase-timing-s"]
    measured_rounds = sum(timing.get(phase, 0.0) for phase in ("cvae", "classifier"))
    fixed = whole_run["wall-s"] - measured_rounds
    quality = timing.get("generator-quality", 0.0)
    rows, total = [], 0.0
    for k, runs in GRID:
        round_s = rest_of_round + (real_images + CLIENTS * k) / train_throughput
        # k = 0: no CVAE, so no CVAE phase and no generator-quality check
        run_s = ROUNDS * round_s + (cvae_phase + fixed if k else fixed - quality)
        total += runs * run_s
        rows.append(
            {
                "k": k,
                "runs": runs,
                "classifier round s": round(round_s, 1),
                "run min": round(run_s / 60, 1),
                "runs h": round(runs * run_s / 3600, 1),
            }
        )
    estimate = {
        "grid-hours": round(total / 3600, 1),
        "train-images-per-second": round(train_throughput, 1),
        "rest-of-round-s": round(rest_of_round, 2),
        "cvae-phase-s": round(cvae_phase, 1),
        "fixed-per-run-s": round(fixed, 1),
        "generator-quality-s": quality,
    }
    print_table(
        f"estimated run time per grid cell (100 clients, full MNIST, {args.machine})",
        rows,
        list(rows[0]),
    )
    print(f"full grid of {sum(r for _, r in GRID)} runs ~ {estimate['grid-hours']} h")
    save_results(
        args.output,
        {
            "benchmark": "grid-estimate",
            "machine": args.machine,
            "grid": GRID,
            "rows": rows,
            "estimate": estimate,
            "inputs": [args.classifier, args.cvae, args.memory],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
