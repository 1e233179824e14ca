"""Everything a short lease of a GPU machine should measure, in one command with a wall budget.

In order of value, each part skippable, the JSON rewritten (atomically) after every part so
that a later part's failure, or the budget running out, loses nothing measured before it:

1. ``run``: one whole paper-scale run through the launcher ``make run`` uses
   (``python -m fedaug_flwr.launch``): 100 clients on full MNIST, a cell of the paper-scale
   campaign (``conf/paper-scale.yaml``: the as-run preset, 15 CVAE + 15 classifier rounds;
   default beta 0.1, minority imputation, k = 100: CVAE, imputation and classifier all
   run), every client actor 1 CPU core and ``--gpus-per-client`` of the GPU. Recorded:
   the summary's phase times (``timing-s``), the command's wall time, peak memory, and,
   when it completed, its compact results as the campaign publishes them
   (``campaign/summary.json``, ``campaign/clients.csv``, made-on naming the GPU), to be
   copied to ``docs/results/paper-scale/<cell>/seed-<s>/``. A run stopped by the budget
   (status ``stopped``) keeps its launcher log and its timeline: start-up, phase and
   round times, saved as their lines arrive, and the classifier phase's projected end.
2. ``pretrain``: the finetune variant's server pretraining (``pretrain = federated``) at
   paper scale, alone (70,000 synthetic images, 15 epochs, batch 32), on the run's CVAE
   (a fresh one if the run made none: the same work). A whole finetune run would not fit
   beside part 1 in one command. Each epoch's time is read from its log line as it
   arrives, so a pretraining stopped by the budget still gives its epochs.
3. ``local-epoch``: ``bench.local_epoch`` on CUDA (today's loop, fused, channels-last,
   ``torch.compile``, CUDA graphs via ``mode="reduce-overhead"``), each with its gradient
   error against float64; SGD batch 10 (the as-run preset) first, then Adam batch 32.
4. ``grid``: the study's grid estimate redone from part 1's whole run
   (``bench.grid_estimate --whole-runs``).

    python -m bench.gpu_check --data-dir <MNIST IDX folder> --out <folder>
    python -m bench.gpu_check --tiny --data-dir <small IDX folder> --out <folder>  # CPU check

``--tiny`` runs the same code path on the CPU at toy size (4 clients, 1 + 1 rounds, a
short local-epoch list), which is how it is tested. Results: ``<out>/gpu-check.json``
and the logs beside it; the run's own folder (weights, checkpoint) stays in ``--scratch``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import grid_estimate
from bench.common import REPO_ROOT, gpu_names, machine_info, read_json, run_child
from fedaug_flwr.results import read_summary, write_json

RESULT = "gpu-check.json"
PARTS = ("run", "pretrain", "local-epoch", "grid")
DEFAULT_BUDGET_S = 510.0  # 8.5 min: the device tool's 10-min command, less installs and margin
RESERVE_S = 10.0  # kept back for the grid estimate and the last write
MIN_PART_S = 30.0  # a part with less time than this left is skipped
STOP_GRACE_S = 45.0  # a stopped launcher's time to stop its Flower and Ray processes
CAMPAIGN_FILE = REPO_ROOT / "conf" / "paper-scale.yaml"
# --tiny: the same path at toy size (tests/conftest.py's TINY, with room for 4 clients)
TINY_RUN = {
    "cvae-rounds": 1,
    "clf-rounds": 1,
    "eval-batch-size": 256,
    "quality-samples": 140,
    "quality-epochs": 1,
    "pretrain-samples": 140,
    "pretrain-epochs": 1,
}
EPOCH_LINE = re.compile(r"pretraining epoch (\d+)/(\d+)")
PROGRESS_LINE = re.compile(r"fedaug-flwr progress: (\w[\w-]*) round (\d+)/(\d+)")
PHASE_LINE = re.compile(r"\[fedaug\] phase '([\w-]+)' (starts|took ([\d.]+) s)")


class GpuCheck:
    """The budget's clock and the one results file, rewritten after every part."""

    def __init__(self, out: Path, budget_s: float, settings: dict) -> None:
        self.out = out
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.results: dict = {
            "benchmark": "gpu-check",
            "settings": settings,
            "budget-s": budget_s,
            "parts": {},
        }

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.results["elapsed-s"] = round(time.monotonic() - self.start, 1)
        write_json(self.out / RESULT, self.results)

    def part(self, name: str, skip: bool, work: Callable[[float], dict]) -> dict:
        """Run ``work(seconds it may take)`` unless skipped or out of time; record and save."""
        started = time.monotonic()
        left = self.left() - RESERVE_S
        if skip:
            entry = {"status": "skipped", "reason": "by flag"}
        elif name != "grid" and left < MIN_PART_S:
            entry = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
        else:
            print(f"[gpu-check] {name}: up to {left:.0f} s", flush=True)
            try:
                entry = {"status": "done", **work(left)}
            except Exception as error:  # noqa: BLE001 - a part's failure must not lose the others
                entry = {
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:],
                }
        entry["part-s"] = round(time.monotonic() - started, 1)
        self.results["parts"][name] = entry
        self.save()
        print(f"[gpu-check] {name}: {entry['status']} in {entry['part-s']} s", flush=True)
        return entry


# ----------------------------------------------------------------------------- machine


def describe_machine() -> dict:
    info = machine_info()
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia-smi"] = f"not available: {error}"
    versions = {}
    for name in ("protobuf", "grpcio", "opacus", "flwr-datasets", "datasets", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is what this records
            versions[name] = None
    info["packages"] = versions
    return info


# ----------------------------------------------------------------------------- 1. whole run


class RunTimeline:
    """When the launcher's phase and round lines arrived: the timings of a run the budget
    stopped, which writes no ``summary.json`` (the log itself carries no clock)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.phase_starts: dict[str, float] = {}
        self.phase_s: dict[str, float] = {}
        self.rounds: dict[str, list[tuple[int, int, float]]] = {}  # phase: (round, of, at)
        self.last: dict[str, str] = {}

    def see(self, line: str, at: float | None = None) -> bool:
        """Note ``line`` if it is a phase or round line (then True), arriving ``at`` s."""
        at = time.monotonic() - self.start if at is None else at
        if match := PROGRESS_LINE.search(line):
            phase, number, of = match.group(1), int(match.group(2)), int(match.group(3))
            self.last[phase] = line.strip()
            seen = self.rounds.setdefault(phase, [])
            if all(r[0] != number for r in seen):
                seen.append((number, of, at))
        elif match := PHASE_LINE.search(line):
            if match.group(3) is None:
                self.phase_starts.setdefault(match.group(1), at)
            else:
                self.phase_s[match.group(1)] = float(match.group(3))
        else:
            return False
        return True

    def report(self) -> dict:
        """Startup, each finished phase's own time, each phase's round times, and, for a
        run stopped in its classifier phase, when that phase would have ended."""
        out: dict = {
            "startup-s": round(min(self.phase_starts.values()), 1) if self.phase_starts else None,
            "phase-s": self.phase_s,
            "round-s": {},
        }
        for phase, seen in self.rounds.items():
            gaps = [b[2] - a[2] for a, b in zip(seen, seen[1:], strict=False)]
            out["round-s"][phase] = [round(gap, 1) for gap in gaps]
        rounds = self.rounds.get("classifier", [])
        gaps = sorted(out["round-s"].get("classifier", []))
        if "classifier" not in self.phase_s and len(gaps) >= 2:
            number, of, at = rounds[-1]
            median = gaps[len(gaps) // 2]
            out["projected"] = {
                "classifier-end-s": round(at + (of - number + 1) * median, 1),
                "basis": f"round {number}/{of} began at {at:.0f} s; the rest at the median "
                f"round ({median:.1f} s); final evaluation and writing not included",
            }
        return out


def campaign_run(beta: float, imputation: str, k: int, pretrain: str, seed: int):
    """The paper-scale campaign's run of this cell and seed (its exact run config)."""
    from fedaug_flwr.experiments.campaign import ordered_runs
    from fedaug_flwr.experiments.grid import load_spec

    wanted = {"dirichlet-beta": beta, "imputation": imputation, "num-synthetic": k}
    wanted["pretrain"] = pretrain
    for run in ordered_runs(load_spec(CAMPAIGN_FILE)):
        if run.seed == seed and all(run.run_config.get(key) == v for key, v in wanted.items()):
            return run
    raise ValueError(f"{CAMPAIGN_FILE.name} has no run {wanted} seed {seed}")


def whole_run(check: GpuCheck, args: argparse.Namespace, seconds: float) -> dict:
    from fedaug_flwr.experiments.campaign import code_version, publish
    from fedaug_flwr.processes import to_overrides

    run = campaign_run(args.beta, args.imputation, args.k, "off", args.seed)
    folder = args.scratch / "run"
    run_config = {**run.run_config, "data-dir": str(args.data_dir), "output-dir": str(folder)}
    if args.tiny:
        run_config.update({**TINY_RUN, "dirichlet-beta": 0.5, "num-synthetic": 40})
    timeline = RunTimeline()
    # the grace lets a stopped run free the GPU for the parts after it; with none after
    # it, the run may take the whole budget but 5 s to stop it (then SIGKILL)
    later = not (args.skip_pretrain and args.skip_local_epoch)
    grace_s = STOP_GRACE_S if later else 5.0
    limit_s = max(seconds - grace_s, 1.0)
    # Lines are read in a thread of their own that may outlive run_child (a process
    # outside the launcher's group still holding its output): once the run's entry is
    # made, a late line must not put the "running" one back over it.
    saving, ended = threading.Lock(), threading.Event()

    def on_line(line: str) -> None:  # saved as it goes: a command killed still tells
        with saving:
            if not ended.is_set() and timeline.see(line):
                check.results["parts"]["run"] = {"status": "running", "timeline": timeline.report()}
                check.save()

    command = [
        "--num-supernodes",
        str(args.clients),
        "--num-cpus",
        "1",
        "--num-gpus",
        str(args.gpus_per_client),
        "--run-config",
        to_overrides(run_config),
    ]
    child = run_child(
        "fedaug_flwr.launch",
        command,
        timeout_s=limit_s,
        log_path=check.out / "whole-run.log",
        on_line=on_line,
        grace_s=grace_s,
    )
    with saving:
        ended.set()
    summary = read_summary(folder)
    # stopped by the budget: no failure, its timeline has its times
    entry: dict = {
        **({} if summary else {"status": "stopped" if child.timed_out else "failed"}),
        "campaign-cell": str(run.relative_dir),
        "campaign-result": not args.tiny and summary is not None,
        "launcher": ["python", "-m", "fedaug_flwr.launch", *command],
        "clients": args.clients,
        "gpus-per-client": args.gpus_per_client,
        "returncode": child.returncode,
        "wall-s": child.wall_s,
        "memory": child.memory,
        "completed": summary is not None,
        "last-progress": timeline.last,
        "timeline": timeline.report(),
    }
    if summary is None:
        entry["output-tail"] = child.output_tail[-3000:]
        return entry
    final = summary.get("final") or {}
    entry.update(
        {
            "timing-s": summary.get("timing-s"),
            "cvae-round-timing-s": (summary.get("cvae") or {}).get("round-timing-s"),
            "classifier-round-timing-s": summary["classifier"].get("round-timing-s"),
            "final-global-test": final.get("global-test"),
            "data": summary.get("data"),
        }
    )
    machine = check.results.get("machine", {})
    made_on = {"made-on": {key: machine.get(key) for key in ("gpus", "cpu", "logical-cpus")}}
    code = code_version(REPO_ROOT)
    if code["code-commit"] == "unknown" and args.code_commit:  # a copy of the tree, not a clone
        code = {"code-commit": args.code_commit, "code-changed": "unknown (a copy of the tree)"}
    publish(folder, check.out / "campaign", {**code, **made_on})
    entry["published"] = ["campaign/summary.json", "campaign/clients.csv"]
    return entry


# ----------------------------------------------------------------------------- 2. pretraining


def pretraining(check: GpuCheck, args: argparse.Namespace, seconds: float) -> dict:
    output = args.scratch / "pretrain.json"
    cvae = args.scratch / "run" / "cvae.pt"
    start = time.monotonic()
    epochs: list[dict] = []

    def on_line(line: str) -> None:
        match = EPOCH_LINE.search(line)
        if match and all(e["epoch"] != int(match.group(1)) for e in epochs):
            at = time.monotonic() - start
            epochs.append({"epoch": int(match.group(1)), "of": int(match.group(2)), "at-s": at})

    child_args = ["pretrain-child", "--data-dir", str(args.data_dir), "--seed", str(args.seed)]
    child_args += ["--beta", str(args.beta), "--cvae", str(cvae), "--output", str(output)]
    child = run_child(
        "bench.gpu_check",
        [*child_args, *(["--tiny"] if args.tiny else [])],
        timeout_s=seconds,
        log_path=check.out / "pretrain.log",
        on_line=on_line,
    )
    measured = read_json(output) if output.is_file() else {}
    gaps = [b["at-s"] - a["at-s"] for a, b in zip(epochs, epochs[1:], strict=False)]
    return {
        **measured,
        "completed": bool(measured),
        "returncode": child.returncode,
        "wall-s": child.wall_s,
        "epochs-seen": [{**e, "at-s": round(e["at-s"], 1)} for e in epochs],
        "epoch-s-median": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "output-tail": "" if measured else child.output_tail[-3000:],
    }


def pretrain_child(argv: Sequence[str]) -> int:
    """In its own process (so the budget can stop it): the server's pretraining, timed."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check pretrain-child")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--cvae", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    import logging

    import torch

    from fedaug_flwr import log
    from fedaug_flwr.config import AppConfig
    from fedaug_flwr.data import load_source, resolve_source
    from fedaug_flwr.models import CVAE
    from fedaug_flwr.results import load_state_dict
    from fedaug_flwr.server_work import pretrain_on_server
    from fedaug_flwr.training import TensorData

    if not logging.getLogger("flwr").handlers:  # Flower's own handler prints them otherwise
        log.addHandler(logging.StreamHandler(sys.stdout))  # the epoch lines the parent times
    log.setLevel(logging.INFO)
    run = campaign_run(args.beta, "none", 0, "federated", args.seed)
    run_config = {**run.run_config, "data-dir": str(Path(args.data_dir).resolve())}
    if args.tiny:
        run_config.update(TINY_RUN)
    config = AppConfig.from_run_config(run_config)
    source, location, _ = resolve_source(config.dataset, config.data_dir)
    data = load_source(source, location, config.binarized)
    global_test = TensorData.from_digits(data.test)
    if args.cvae.is_file():
        weights, cvae_source = load_state_dict(args.cvae), "the whole run's CVAE"
    else:
        torch.manual_seed(args.seed)
        weights, cvae_source = CVAE(config.cvae_latent_dim).state_dict(), "a fresh CVAE"
    with tempfile.TemporaryDirectory(prefix="fedaug-pretrain-") as folder:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        work = pretrain_on_server(weights, config, global_test, Path(folder))
        seconds = time.perf_counter() - start
    write_json(
        args.output,
        {
            "seconds": round(seconds, 2),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cvae": cvae_source,
            "data-source": source,
            "samples": config.pretrain_samples,
            "epochs": config.pretrain_epochs,
            "batch-size": config.pretrain_batch_size,
            "real-test": work.section["quality"]["real-test"],
        },
    )
    return 0


# ----------------------------------------------------------------------------- 3. local epoch


def local_epochs(check: GpuCheck, args: argparse.Namespace, seconds: float) -> dict:
    """bench.local_epoch per optimiser (SGD first), each in its own process and time limit."""
    deadline = time.monotonic() + seconds
    run = check.results["parts"].get("run", {})
    timing = run.get("timing-s") or {}
    train = sum(r.get("train", 0.0) for r in run.get("classifier-round-timing-s") or [])
    rows, by_optimiser = [], {}
    for optimiser in args.optimisers:
        left = deadline - time.monotonic()
        if left < MIN_PART_S:
            by_optimiser[optimiser] = {"status": "skipped", "reason": f"{left:.0f} s left"}
            continue
        output = args.scratch / f"local-epoch-{optimiser}.json"
        child_args = ["--device", "cpu" if args.tiny else "cuda", "--optimisers", optimiser]
        child_args += ["--images", str(args.epoch_images), "--repeats", str(args.epoch_repeats)]
        child_args += ["--variants", *args.variants, "--output", str(output)]
        if timing.get("total") and train:  # the whole run's own numbers for its estimate
            child_args += ["--run-seconds", str(timing["total"])]
            child_args += ["--share", f"{train / timing['total']:.3f}"]
        log_path = check.out / "local-epoch.log"
        child = run_child("bench.local_epoch", child_args, timeout_s=left, log_path=log_path)
        if output.is_file():
            measured = read_json(output)
            rows += measured["variants"]
            by_optimiser[optimiser] = {
                "status": "done",
                "wall-s": child.wall_s,
                "settings": measured["settings"],
                "paper-scale-run": measured["paper-scale-run"],
            }
        else:
            by_optimiser[optimiser] = {
                "status": "failed" if child.returncode else "stopped",
                "wall-s": child.wall_s,
                "output-tail": child.output_tail[-3000:],
            }
        check.results["parts"]["local-epoch"] = {"status": "running", "variants": rows}
        check.save()
    return {"variants": rows, "optimisers": by_optimiser}


# ----------------------------------------------------------------------------- 4. grid


def grid(check: GpuCheck, args: argparse.Namespace, seconds: float) -> dict:
    published = check.out / "campaign" / "summary.json"
    if not published.is_file():
        return {"estimate": None, "reason": "no completed whole run to estimate from"}
    runs = [grid_estimate.whole_run(read_json(published), "campaign/summary.json")]
    rows = grid_estimate.estimate_from_runs(runs)
    known = [row for row in rows if "runs h" in row]
    hours = round(sum(row["runs h"] for row in known), 1) if len(known) == len(rows) else None
    return {"rows": rows, "grid-hours": hours, "runs": runs}


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain-child"]:
        return pretrain_child(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="MNIST IDX folder")
    parser.add_argument("--out", type=Path, required=True, help="results folder (JSON, logs)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall budget")
    parser.add_argument("--scratch", type=Path, help="run folders (default: a temporary one)")
    parser.add_argument("--tiny", action="store_true", help="toy size on the CPU (a check)")
    for part in PARTS:
        parser.add_argument(f"--skip-{part}", action="store_true", help=f"leave '{part}' out")
    parser.add_argument("--clients", type=int, help="default 100 (4 with --tiny)")
    parser.add_argument("--gpus-per-client", type=float, help="default 0.1 (0 with --tiny)")
    parser.add_argument("--beta", type=float, default=0.1, help="the campaign cell's beta")
    parser.add_argument("--imputation", default="minority", choices=["none", "uniform", "minority"])
    parser.add_argument("--k", type=int, default=100, help="num-synthetic (0 with none)")
    parser.add_argument("--seed", type=int, default=1, help="the campaign run's seed")
    parser.add_argument(
        "--code-commit", help="the commit of this tree, where it is a copy without git"
    )
    parser.add_argument("--optimisers", nargs="+", help="default sgd adam (sgd with --tiny)")
    parser.add_argument("--variants", nargs="+", help="local-epoch variants (default: all)")
    parser.add_argument("--epoch-images", type=int, help="default 600 (60 with --tiny)")
    parser.add_argument("--epoch-repeats", type=int, help="default 5 (1 with --tiny)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.clients = args.clients or (4 if tiny else 100)
    args.gpus_per_client = (
        (0.0 if tiny else 0.1) if args.gpus_per_client is None else args.gpus_per_client
    )
    args.optimisers = args.optimisers or (["sgd"] if tiny else ["sgd", "adam"])
    args.epoch_images = args.epoch_images or (60 if tiny else 600)
    args.epoch_repeats = args.epoch_repeats or (1 if tiny else 5)
    from bench.local_epoch import VARIANT_NAMES

    args.variants = args.variants or (["today", "fused"] if tiny else VARIANT_NAMES)
    args.data_dir = args.data_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    owned_scratch = args.scratch is None
    args.scratch = (
        Path(tempfile.mkdtemp(prefix="fedaug-gpu-check-")) if owned_scratch else args.scratch
    )
    args.scratch.mkdir(parents=True, exist_ok=True)
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in ("data_dir", "out", "scratch")  # this machine's folders
    }
    check = GpuCheck(args.out, args.budget_s, settings)
    check.results["machine"] = describe_machine()
    check.save()
    if not tiny and not gpu_names():
        check.results["error"] = "torch sees no CUDA device (use --tiny for a CPU check)"
        check.save()
        print(f"bench.gpu_check: {check.results['error']}", file=sys.stderr)
        return 2
    print(f"[gpu-check] GPU: {', '.join(gpu_names()) or 'none (tiny, CPU)'}", flush=True)
    parts: dict[str, Callable[[GpuCheck, argparse.Namespace, float], dict]] = {
        "run": whole_run,
        "pretrain": pretraining,
        "local-epoch": local_epochs,
        "grid": grid,
    }
    for name, work in parts.items():
        check.part(
            name,
            getattr(args, f"skip_{name.replace('-', '_')}"),
            lambda s, w=work: w(check, args, s),
        )
    if owned_scratch:
        shutil.rmtree(args.scratch, ignore_errors=True)
    print(json.dumps({n: p["status"] for n, p in check.results["parts"].items()}))
    print(f"[gpu-check] results in {args.out / RESULT} ({check.results['elapsed-s']} s)")
    failed = [n for n, p in check.results["parts"].items() if p["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
