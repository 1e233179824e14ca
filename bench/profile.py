"""Where a simulation's time goes: py-spy on the driver and the client actors.

Starts one Flower simulation of the app (``bench.flower_child``), waits
until the classifier phase starts (actors warm), records the driver and the
first two ``ClientAppActor`` processes with py-spy for ``--duration``
seconds, stops the simulation, and writes for each process the raw samples
and a table of the functions holding the most samples (inclusive: with what
they call; self: in the function itself).

    python -m bench.profile --variant real --num-supernodes 10 --dataset mnist-5k
    python -m bench.profile --variant noop-clf --num-supernodes 100   # Flower's own share
    python -m bench.profile --variant noop-clf --num-supernodes 1000 --dataset mnist \
        --run-config '{"dirichlet-beta": 100.0}'   # 1,000 clients of 60 images
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.client_apps import VARIANTS
from bench.common import REPO_ROOT, RESULTS_DIR, default_data_dir, load_average, machine_info
from fedaug_flwr.processes import SIMULATION_ENV, stop_process_tree

ACTOR = "ray::ClientAppActor"


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func @ file path from the package root``."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    return f"{function} @ {path.split('site-packages/')[-1]}"


def summarize_raw(path: Path, top: int = 40) -> dict:
    """Inclusive and self sample counts per function from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame_name(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += samples
        own[frames[-1]] += samples

    def table(counter: collections.Counter[str]) -> list[dict]:
        return [
            {"function": name, "samples": n, "share": round(n / max(total, 1), 3)}
            for name, n in counter.most_common(top)
        ]

    return {"samples": total, "inclusive": table(inclusive), "self": table(own)}


def wait_for(process: subprocess.Popen, marker: str, lines: list[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(marker in line for line in lines):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="real")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--dataset", choices=("mnist", "mnist-5k"), default="mnist-5k")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--duration", type=int, default=30, help="seconds of sampling")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR / "profiles"))
    parser.add_argument(
        "--run-config",
        default="{}",
        type=json.loads,
        help="JSON object of extra run-config values, e.g. '{\"dirichlet-beta\": 100.0}'",
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    run_dir = Path(tempfile.mkdtemp(prefix="fedaug-bench-profile-"))
    run_config = {
        "dataset": args.dataset,
        "cvae-rounds": 1,
        "clf-rounds": 50,  # more than the sampling needs; the run is stopped afterwards
        "quality-samples": 0,
        "output-dir": str(run_dir / "run"),
        **args.run_config,
    }
    if args.dataset == "mnist":
        run_config["data-dir"] = args.data_dir
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.flower_child",
            "--variant",
            args.variant,
            "--num-supernodes",
            str(args.num_supernodes),
            "--run-config",
            json.dumps(run_config),
        ],
        cwd=REPO_ROOT,
        env={**SIMULATION_ENV, **os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True).start()
    name = f"{args.variant}-{args.num_supernodes}-{args.dataset}"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(),
        "variant": args.variant,
        "run-config": run_config,
        "num-supernodes": args.num_supernodes,
        "duration-s": args.duration,
    }
    try:
        if not wait_for(child, "phase 'classifier' starts", lines, timeout_s=1800):
            print("".join(lines[-40:]), file=sys.stderr)
            print("[bench] the classifier phase never started", file=sys.stderr)
            return 1
        tree = psutil.Process(child.pid).children(recursive=True)
        actors = [p.pid for p in tree if p.cmdline()[:1] == [ACTOR]][:2]
        targets = {"driver": child.pid, **{f"actor-{i}": pid for i, pid in enumerate(actors)}}
        recorders = {
            role: subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.duration),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(run_dir / f"{role}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for role, pid in targets.items()
        }
        for recorder in recorders.values():
            recorder.wait(timeout=args.duration + 60)
        report["load-average-after"] = load_average()
        report["processes"] = {}
        for role in targets:
            raw = run_dir / f"{role}.txt"
            if raw.is_file():
                report["processes"][role] = summarize_raw(raw)
        print(f"[bench] profiles of {', '.join(report['processes'])}")
    finally:
        stop_process_tree(child, grace_s=5.0)
        shutil.rmtree(run_dir, ignore_errors=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for role, summary in report["processes"].items():
        print(f"\n{role}: {summary['samples']} samples; inclusive top 15")
        for row in summary["inclusive"][:15]:
            print(f"  {row['share']:6.1%}  {row['function']}")
    print(f"\n[bench] written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
