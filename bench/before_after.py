"""Before and after: the default ``make run`` command of another git revision against this tree.

The other revision (default: where this branch left ``main``, so that only
this branch's changes differ) is exported with ``git archive`` into a
temporary folder (the repository is only read). Both trees then run
``python -m fedaug_flwr.launch`` (what ``make run`` runs: flwr run, 10
SuperNodes, 1 CPU each, mnist-5k) with the same run config, alternately,
``--repeats`` times. Reported: wall time and CPU time of the whole process
tree, and whether the two give the same results for the same seed (every
client's counts and metrics, the final and per-round metrics).

    python -m bench.before_after --run-config "cvae-rounds=2 clf-rounds=2" --repeats 2
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    load_average,
    machine_info,
    median,
    print_table,
    ratio,
    run_child,
    save_results,
)
from fedaug_flwr.launch import parse_overrides, to_overrides
from fedaug_flwr.results import read_summary

# Parts of summary.json that depend on the seed and the code, not on the clock.
RESULT_KEYS = ("data", "imputation", "clients", "final")
# Older trees summed some metrics in reply-arrival order: equal up to float rounding.
RELATIVE_TOLERANCE = 1e-12


def close(first: object, second: object, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    """Equal, except that floats may differ by ``tolerance`` relative to their size."""
    if isinstance(first, float) and isinstance(second, float):
        return math.isclose(first, second, rel_tol=tolerance, abs_tol=tolerance)
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(close(first[k], second[k]) for k in first)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(map(close, first, second))
    return first == second


def export_revision(revision: str, folder: Path) -> str:
    """The tree of ``revision`` in ``folder``; returns the commit it resolved to."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return commit


def merge_base(first: str, second: str) -> str:
    return subprocess.run(
        ["git", "merge-base", first, second],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def comparable(summary: dict) -> dict:
    """The seed-determined results of a run (no timings, paths or dates)."""
    result = {key: summary.get(key) for key in RESULT_KEYS}
    # Node ids are drawn anew by every simulation; partition ids identify the clients.
    result["clients"] = [
        {k: v for k, v in client.items() if k != "node-id"} for client in result["clients"] or []
    ]
    for phase in ("cvae", "classifier"):
        rounds = summary.get(phase, {}).get("rounds", [])
        result[phase] = rounds
    if result["data"]:
        result["data"] = {k: v for k, v in result["data"].items() if k != "location"}
    return result


def launch(tree: Path, supernodes: int, run_config: dict, output: Path) -> dict:
    child = run_child(
        "fedaug_flwr.launch",
        [
            "--num-supernodes",
            str(supernodes),
            "--run-config",
            to_overrides({**run_config, "output-dir": str(output)}),
        ],
        cwd=tree,
    )
    summary = read_summary(output)
    if child.returncode != 0 or summary is None:
        raise RuntimeError(f"run in {tree} failed:\n{child.output_tail}")
    return {
        "wall-s": child.wall_s,
        "cpu-s": child.memory["cpu-s"],
        "peak-pss-sum-gib": child.memory["peak-pss-sum-gib"],
        "phase-timing-s": summary["timing-s"],
        "results": comparable(summary),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.before_after", description=__doc__)
    parser.add_argument(
        "--baseline",
        default=None,
        help="git revision to compare against (default: merge-base of HEAD and main)",
    )
    parser.add_argument("--num-supernodes", type=int, default=10, help="as make run")
    parser.add_argument("--run-config", action="append", default=[], metavar="'k=v k2=v2'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS_DIR / "before-after.json"))
    args = parser.parse_args(argv)
    run_config = parse_overrides(args.run_config)
    baseline = args.baseline or merge_base("HEAD", "main")
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fedaug-bench-before-after-"))
    try:
        baseline_commit = export_revision(baseline, workdir / "baseline")
        trees = {"before": workdir / "baseline", "after": REPO_ROOT}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                print(f"[bench] {name} ({tree}) repeat {repeat + 1}/{args.repeats}", flush=True)
                output = workdir / f"{name}-{repeat}"
                runs[name].append(launch(tree, args.num_supernodes, run_config, output))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    reference = runs["before"][0]["results"]
    results = [run["results"] for name in runs for run in runs[name]]
    same = all(result == reference for result in results)
    same_rounded = all(close(result, reference) for result in results)
    rows = [
        {
            "tree": name,
            "wall s (median)": median(r["wall-s"] for r in runs[name]),
            "CPU s (median)": median(r["cpu-s"] for r in runs[name]),
            "peak PSS GiB": max(r["peak-pss-sum-gib"] or 0 for r in runs[name]),
        }
        for name in runs
    ]
    report = {
        "benchmark": "before-after",
        "machine": machine,
        "baseline": {"revision": baseline, "commit": baseline_commit},
        "num-supernodes": args.num_supernodes,
        "run-config": run_config,
        "repeats": args.repeats,
        "summary": rows,
        "after-over-before-wall": ratio(rows[1]["wall s (median)"], rows[0]["wall s (median)"]),
        "after-over-before-cpu": ratio(rows[1]["CPU s (median)"], rows[0]["CPU s (median)"]),
        "same-results": same,
        f"same-results-within-{RELATIVE_TOLERANCE:g}": same_rounded,
        # the timings of every run; their results only as the verdict above (whole
        # summaries per run made the report hundreds of KB that nothing reads)
        "runs": {
            name: [{k: v for k, v in run.items() if k != "results"} for run in tree_runs]
            for name, tree_runs in runs.items()
        },
        "load-average-at-end": load_average(),
    }
    print_table(
        f"make run's command, {baseline_commit[:8]} vs this tree, "
        f"{args.num_supernodes} SuperNodes, {to_overrides(run_config) or 'defaults'}",
        rows,
        list(rows[0]),
    )
    print(
        f"same results for the same seed: {same} (bit for bit), {same_rounded} "
        f"(floats within a relative {RELATIVE_TOLERANCE:g})"
    )
    save_results(args.output, report)
    return 0 if same_rounded else 1


if __name__ == "__main__":
    sys.exit(main())
