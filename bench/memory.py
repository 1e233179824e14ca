"""Benchmark 4: peak memory of a whole run, driver plus actors.

Runs the app exactly as ``make run`` does (``python -m fedaug_flwr.launch``:
a private SuperLink, ``flwr run``, the simulation with its Ray actors) and
samples the memory of that whole process tree every half second. Reported:
the peak of the summed PSS (each shared page split among the processes that
map it: what the run really occupies) and of the summed RSS (shared pages
counted once per process: an upper bound), with the processes at the peak.

    python -m bench.memory                          # 100 clients, full MNIST, 1 + 1 rounds
    python -m bench.memory --num-supernodes 10 --dataset mnist-5k
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    default_data_dir,
    load_average,
    machine_info,
    print_table,
    run_child,
    save_results,
)
from fedaug_flwr.data import find_idx_folder
from fedaug_flwr.launch import to_overrides
from fedaug_flwr.results import read_summary

LIMIT_GIB = 4.0  # the target at 100 clients on full MNIST


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=1, help="CPU cores per client actor")
    parser.add_argument("--dataset", choices=("mnist", "mnist-5k"), default="mnist")
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument("--cvae-rounds", type=int, default=1)
    parser.add_argument("--clf-rounds", type=int, default=1)
    parser.add_argument("--num-synthetic", type=int, default=100)
    parser.add_argument("--output", default=str(RESULTS_DIR / "memory.json"))
    args = parser.parse_args(argv)
    if args.dataset == "mnist" and find_idx_folder(Path(args.data_dir)) is None:
        parser.error(f"--data-dir {args.data_dir} holds no MNIST IDX files")
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fedaug-bench-memory-"))
    run_config = {
        "dataset": args.dataset,
        "cvae-rounds": args.cvae_rounds,
        "clf-rounds": args.clf_rounds,
        "num-synthetic": args.num_synthetic,
        "output-dir": str(workdir / "run"),
    }
    if args.dataset == "mnist":
        run_config["data-dir"] = args.data_dir
    try:
        child = run_child(
            "fedaug_flwr.launch",
            [
                "--num-supernodes",
                str(args.num_supernodes),
                "--num-cpus",
                str(args.num_cpus),
                "--run-config",
                to_overrides(run_config),
            ],
        )
        summary = read_summary(workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if child.returncode != 0 or summary is None:
        print(child.output_tail, file=sys.stderr)
        print(f"[bench] the run failed (exit code {child.returncode})", file=sys.stderr)
        return 1
    memory = child.memory
    report = {
        "benchmark": "memory",
        "machine": machine,
        "command": "python -m fedaug_flwr.launch (flwr run on a private SuperLink, as make run)",
        "num-supernodes": args.num_supernodes,
        "cpus-per-client": args.num_cpus,
        "run-config": run_config,
        "wall-s": child.wall_s,
        "phase-timing-s": summary["timing-s"],
        "memory": memory,
        "limit-gib": LIMIT_GIB,
        "under-limit": (memory["peak-pss-sum-gib"] or memory["peak-rss-sum-gib"]) < LIMIT_GIB,
        "load-average-at-end": load_average(),
    }
    print_table(
        f"peak memory of the whole run ({args.num_supernodes} clients, {args.dataset}, "
        f"{args.cvae_rounds} CVAE + {args.clf_rounds} classifier rounds)",
        [
            {
                "PSS sum GiB": memory["peak-pss-sum-gib"],
                "RSS sum GiB": memory["peak-rss-sum-gib"],
                "processes": memory["peak-processes"],
                "limit GiB": LIMIT_GIB,
                "wall s": child.wall_s,
            }
        ],
        ["PSS sum GiB", "RSS sum GiB", "processes", "limit GiB", "wall s"],
    )
    print_table(
        "processes at the peak",
        memory["at-peak-rss-gib"],
        ["process", "rss", "pss"],
    )
    save_results(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
