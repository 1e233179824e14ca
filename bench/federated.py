"""Benchmarks 1 and 2: a phase's rounds in the Flower app against the plain loop.

For every scale (clients x dataset) and every repeat, three child processes
run one after the other, each measured on its own:

- ``flower``: the app (its ServerApp and ClientApp) in a Flower simulation,
- ``overhead``: the same simulation with a no-op ClientApp for the phase
  being measured (``bench.client_apps``): Flower's transport, the app's
  per-message bookkeeping and the server's aggregation, no training,
- ``plain``: the plain sequential loop (``bench.plain_loop``).

Seconds per round are medians over every round of every repeat (the first
round of the measured phase included: actors are already warm from the
phase before). ``overhead`` leaves out the server's global evaluation,
which is model work, not Flower's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    default_data_dir,
    load_average,
    machine_info,
    median,
    print_table,
    ratio,
    read_json,
    run_child,
    save_results,
)
from fedaug_flwr.data import find_idx_folder
from fedaug_flwr.results import read_summary

PHASES = {"classifier": "classifier", "cvae": "cvae"}  # phase -> section in summary.json
CHILD_TIMEOUT_S = 3 * 3600
EVALUATE_MESSAGES = "-evaluate-messages"  # suffix of the kinds run with evaluate-on-receipt off
COMPARED = "-compared"  # suffix of the kinds run with --compare-run-config on top


@dataclass(frozen=True)
class Scale:
    clients: int
    dataset: str

    @classmethod
    def parse(cls, text: str) -> Scale:
        try:
            clients, dataset = text.split(":")
            scale = cls(int(clients), dataset)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"scale {text!r} must look like CLIENTS:DATASET, e.g. 100:mnist"
            ) from None
        if scale.clients < 2 or scale.dataset not in ("mnist", "mnist-5k"):
            raise argparse.ArgumentTypeError(
                f"scale {text!r}: need at least 2 clients and dataset 'mnist' or 'mnist-5k'"
            )
        return scale

    def __str__(self) -> str:
        return f"{self.clients}:{self.dataset}"


def has_full_mnist(data_dir: str) -> bool:
    return find_idx_folder(Path(data_dir)) is not None


def run_config(phase: str, scale: Scale, rounds: int, data_dir: str, extra: dict) -> dict:
    """The measured phase gets ``rounds`` rounds, the other one a single round."""
    config = {
        "dataset": scale.dataset,
        "cvae-rounds": rounds if phase == "cvae" else 1,
        "clf-rounds": rounds if phase == "classifier" else 1,
        # The server's generator-quality check (a classifier trained on synthetic
        # images between the phases) is no part of a round; skipping it saves minutes.
        "quality-samples": 0,
        **extra,
    }
    if scale.dataset == "mnist":
        config.setdefault("data-dir", data_dir)
    return config


def flower_variants(phase: str) -> dict[str, str]:
    """Which ClientApp measures the phase, and which one its overhead."""
    if phase == "classifier":
        return {"flower": "real", "overhead": "noop-clf"}
    # For the CVAE phase the classifier work is irrelevant: skip it in both.
    return {"flower": "noop-clf", "overhead": "noop"}


def train_images(row: dict) -> int:
    per_client = row.get("train-per-client")
    if per_client is not None:
        return int(sum(client["num-examples"] for client in per_client))
    return int(row["train"]["num-examples"])


def round_stats(section: dict) -> list[dict]:
    """Training images and timed parts (seconds) of each round of a phase's section."""
    timing = {row["round"]: row for row in section["round-timing-s"]}
    return [
        {
            "round": row["round"],
            "images": train_images(row),
            "parts": {k: v for k, v in timing[row["round"]].items() if k != "round"},
        }
        for row in section["rounds"]
    ]


def round_seconds(stats: dict, without_global: bool) -> float:
    seconds = stats["parts"]["total"]
    if without_global:  # the server's own model evaluation is not Flower's overhead
        seconds -= stats["parts"].get("global-evaluate", 0.0)
    return seconds


def summarize(stats: list[dict], without_global: bool = False) -> dict:
    if not stats:
        return {"rounds-measured": 0}
    parts = sorted({name for s in stats for name in s["parts"]})
    all_seconds = [round(round_seconds(s, without_global), 3) for s in stats]
    seconds = median(all_seconds)
    images = median(s["images"] for s in stats)
    return {
        "rounds-measured": len(stats),
        "seconds-per-round": seconds,
        # With evaluation on receipt the last round also evaluates on its own: the mean
        # counts that; the median is a round in the middle of a phase.
        "seconds-per-round-mean": round(sum(all_seconds) / len(all_seconds), 3),
        "seconds-per-round-all": all_seconds,
        "train-images-per-round": images,
        "images-per-second": ratio(images, seconds),
        # over the rounds that have the part (evaluate messages: only the last round on receipt)
        "parts-median-s": {
            name: median(s["parts"][name] for s in stats if name in s["parts"]) for name in parts
        },
        # each round's parts, in order: a median round's parts may come from several rounds
        "parts-per-round-s": [s["parts"] for s in stats],
    }


def flower_run(
    variant: str, scale: Scale, config: dict, resources: dict, phase: str, workdir: Path
) -> dict:
    output_dir = workdir / f"{variant}-{scale.clients}-{scale.dataset}"
    shutil.rmtree(output_dir, ignore_errors=True)
    args = [
        "--variant",
        variant,
        "--num-supernodes",
        str(scale.clients),
        "--cpus-per-client",
        str(resources["cpus-per-client"]),
        "--gpus-per-client",
        str(resources["gpus-per-client"]),
        "--run-config",
        json.dumps({**config, "output-dir": str(output_dir)}),
    ]
    if resources.get("total-cpus"):
        args += ["--total-cpus", str(resources["total-cpus"])]
    child = run_child("bench.flower_child", args, timeout_s=CHILD_TIMEOUT_S)
    summary = read_summary(output_dir)
    if child.returncode != 0 or summary is None:
        raise RuntimeError(
            f"Flower simulation ({variant}, {scale}) failed with code {child.returncode}:\n"
            f"{child.output_tail}"
        )
    section = summary[PHASES[phase]]
    return {
        "wall-s": child.wall_s,
        "memory": child.memory,
        "phase-timing-s": summary["timing-s"],
        "rounds": round_stats(section),
        "global-test": [row.get("global-test") for row in section["rounds"]],
    }


def plain_run(scale: Scale, config: dict, phase: str, threads: int | None, workdir: Path) -> dict:
    output = workdir / f"plain-{scale.clients}-{scale.dataset}.json"
    args = [
        "--num-clients",
        str(scale.clients),
        "--run-config",
        json.dumps({**config, "output-dir": str(workdir / "unused")}),
        "--output",
        str(output),
    ]
    if threads is not None:
        args += ["--threads", str(threads)]
    if phase == "cvae":
        args.append("--skip-classifier")
    child = run_child("bench.plain_loop", args, timeout_s=CHILD_TIMEOUT_S)
    if child.returncode != 0 or not output.is_file():
        raise RuntimeError(f"plain loop ({scale}) failed:\n{child.output_tail}")
    result = read_json(output)
    section = result[PHASES[phase]]
    return {
        "wall-s": child.wall_s,
        "memory": child.memory,
        "torch-threads": result["torch-threads"],
        "phase-timing-s": result["timing-s"],
        "device": result["device"],
        "rounds": round_stats(section),
        "global-test": [row.get("global-test") for row in section["rounds"]],
    }


def agreement(flower: list[dict], plain: list[dict]) -> dict | None:
    """Largest difference of the global-test metrics, round by round (same seed)."""
    pairs = [(f, p) for f, p in zip(flower, plain, strict=False) if f and p]
    if not pairs:
        return None
    return {
        name: round(max(abs(f[name] - p[name]) for f, p in pairs), 6)
        for name in ("loss", "accuracy", "macro-f1")
    }


def plain_kind(threads: int) -> str:
    return "plain-default-threads" if threads == 0 else f"plain-{threads}-thread"


def measure_scale(
    phase: str,
    scale: Scale,
    config: dict,
    repeats: int,
    resources: dict,
    loop_threads: Sequence[int],
    workdir: Path,
    evaluate_messages: bool = False,
    compared: dict | None = None,
) -> dict:
    """Every kind of run, ``repeats`` times, interleaved so that load changes hit all alike.

    With ``evaluate_messages`` the Flower runs are repeated with
    ``evaluate-on-receipt = false`` (kinds ``flower-evaluate-messages`` and
    ``overhead-evaluate-messages``): the app's two message schemes, side by side.
    With ``compared`` (run-config values) the app's run and the plain loops are
    repeated with those values on top (kinds ``flower-compared``,
    ``plain-1-thread-compared``, ...): a setting against the default, in one run.
    """
    variants = flower_variants(phase)
    flower_kinds = ["flower", "overhead"]
    if evaluate_messages:  # the same two runs with Flower's separate evaluate messages
        flower_kinds += [f"{kind}{EVALUATE_MESSAGES}" for kind in flower_kinds]
    threads_of = {plain_kind(t): t for t in loop_threads}
    plain_kinds = list(threads_of)
    if compared:
        # The no-op ClientApp does no model work, so a model setting would not change it.
        flower_kinds.append(f"flower{COMPARED}")
        threads_of.update({f"{plain_kind(t)}{COMPARED}": t for t in loop_threads})
    kinds = flower_kinds + list(threads_of)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    load_before = load_average()
    for repeat in range(repeats):
        for kind in kinds:
            print(f"[bench] {phase} {scale} repeat {repeat + 1}/{repeats}: {kind}", flush=True)
            kind_config = {**config, **compared} if kind.endswith(COMPARED) else config
            if kind in threads_of:
                run = plain_run(scale, kind_config, phase, threads_of[kind] or None, workdir)
            elif kind.endswith(COMPARED):
                run = flower_run(variants["flower"], scale, kind_config, resources, phase, workdir)
            elif kind.endswith(EVALUATE_MESSAGES):
                base = kind.removesuffix(EVALUATE_MESSAGES)
                separate = {**config, "evaluate-on-receipt": False}
                run = flower_run(variants[base], scale, separate, resources, phase, workdir)
            else:
                run = flower_run(variants[kind], scale, config, resources, phase, workdir)
            runs[kind].append(run)
    stats = {}
    for kind in kinds:
        rounds = [s for r in runs[kind] for s in r["rounds"]]
        stats[kind] = summarize(rounds, without_global=kind.startswith("overhead"))
    # The baseline is the faster of the plain loop's thread settings.
    baseline = min(plain_kinds, key=lambda kind: stats[kind]["seconds-per-round"])
    comparison = {}
    if compared:
        compared_baseline = min(
            (k + COMPARED for k in plain_kinds), key=lambda k: stats[k]["seconds-per-round"]
        )
        comparison = {
            "compared-run-config": compared,
            "compared-plain-baseline": compared_baseline,
            "compared-flower-over-plain": ratio(
                stats[f"flower{COMPARED}"]["seconds-per-round"],
                stats[compared_baseline]["seconds-per-round"],
            ),
            # > 1: the compared setting's round is that many times faster than the default's
            "speedup-of-compared": {
                kind: ratio(
                    stats[kind]["seconds-per-round"], stats[kind + COMPARED]["seconds-per-round"]
                )
                for kind in ["flower", *plain_kinds]
            },
        }
    return {
        "scale": str(scale),
        "clients": scale.clients,
        "dataset": scale.dataset,
        "run-config": config,
        **stats,
        "plain-baseline": baseline,
        "flower-over-plain": ratio(
            stats["flower"]["seconds-per-round"], stats[baseline]["seconds-per-round"]
        ),
        **comparison,
        "metrics-max-difference": {
            kind: agreement(runs["flower"][0]["global-test"], runs[kind][0]["global-test"])
            for kind in kinds
            if kind != "flower" and not kind.startswith("overhead")
        }
        if phase == "classifier"
        else None,
        # The first round of a run also starts the actors (imports, data, partitions)
        # when it is the run's first phase: the CVAE benchmark's round 1.
        "first-round-s": {
            kind: [r["rounds"][0]["parts"]["total"] for r in runs[kind]] for kind in kinds
        },
        "run-wall-s": {kind: [r["wall-s"] for r in runs[kind]] for kind in kinds},
        "run-cpu-s": {kind: [r["memory"]["cpu-s"] for r in runs[kind]] for kind in kinds},
        "peak-memory": {kind: max((r["memory"] for r in runs[kind]), key=_rss) for kind in kinds},
        "plain-torch-threads": {kind: runs[kind][0]["torch-threads"] for kind in plain_kinds},
        "load-average-before-after": [load_before, load_average()],
        "runs": runs,
    }


def compare(
    phase: str,
    scales: Sequence[Scale],
    rounds: int,
    repeats: int,
    resources: dict,
    data_dir: str,
    extra: dict,
    loop_threads: Sequence[int],
    evaluate_messages: bool = False,
    compared: dict | None = None,
) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="fedaug-bench-"))
    try:
        results = [
            measure_scale(
                phase,
                scale,
                run_config(phase, scale, rounds, data_dir, extra),
                repeats,
                resources,
                loop_threads,
                workdir,
                evaluate_messages,
                compared,
            )
            for scale in scales
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "phase": phase,
        "rounds": rounds,
        "repeats": repeats,
        "resources": resources,
        "loop-threads": list(loop_threads),
        "evaluate-messages-compared": evaluate_messages,
        "compared-run-config": compared or None,
        "results": results,
    }


def _rss(memory: dict) -> float:
    return memory["peak-rss-sum-gib"]


def table_rows(results: list[dict]) -> list[dict]:
    return [
        {
            "scale": r["scale"],
            "flower s/round": r["flower"]["seconds-per-round"],
            "plain s/round": r[r["plain-baseline"]]["seconds-per-round"],
            "plain threads": r["plain-torch-threads"][r["plain-baseline"]],
            "flower/plain": r["flower-over-plain"],
            "flower img/s": r["flower"]["images-per-second"],
            "plain img/s": r[r["plain-baseline"]]["images-per-second"],
            "overhead s/round": r["overhead"]["seconds-per-round"],
            **(
                {
                    "flower s/round, evaluate messages": r[f"flower{EVALUATE_MESSAGES}"][
                        "seconds-per-round"
                    ],
                    "overhead s/round, evaluate messages": r[f"overhead{EVALUATE_MESSAGES}"][
                        "seconds-per-round"
                    ],
                }
                if f"overhead{EVALUATE_MESSAGES}" in r
                else {}
            ),
            **(
                {
                    "flower s/round, compared": r[f"flower{COMPARED}"]["seconds-per-round"],
                    "speedup of compared (flower)": r["speedup-of-compared"]["flower"],
                    "flower/plain, compared": r["compared-flower-over-plain"],
                }
                if "speedup-of-compared" in r
                else {}
            ),
            "flower peak GiB (PSS)": r["peak-memory"]["flower"]["peak-pss-sum-gib"],
        }
        for r in results
    ]


def parse_run_config(parser: argparse.ArgumentParser, flag: str, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"{flag} is not JSON: {error}")
    if not isinstance(values, dict):
        parser.error(f"{flag} must be a JSON object, got {text!r}")
    return values


def main(phase: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{'classifier_round' if phase == 'classifier' else 'cvae_phase'}",
        description=f"The {phase} phase's rounds: Flower simulation against a plain loop.",
    )
    parser.add_argument(
        "--scales",
        nargs="+",
        type=Scale.parse,
        default=[Scale.parse(s) for s in ("10:mnist-5k", "100:mnist-5k", "10:mnist", "100:mnist")],
        help="CLIENTS:DATASET pairs (default: 10 and 100 clients on mnist-5k and mnist)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the measured phase")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind per scale")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--total-cpus", type=int, default=None, help="CPUs Ray may use")
    parser.add_argument(
        "--loop-threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="torch threads of the plain loop, one run per value (0: torch's default, all "
        "cores); the faster is the baseline",
    )
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument(
        "--run-config", default="{}", help="JSON object of extra run-config values for both sides"
    )
    if phase == "classifier":
        parser.add_argument(
            "--evaluate-messages",
            action="store_true",
            help="also run Flower with evaluate-on-receipt = false (separate evaluate messages)",
        )
    parser.add_argument(
        "--compare-run-config",
        default=None,
        help="JSON object of run-config values to compare against the default: the Flower "
        "run and the plain loops run again with them on top, in the same run",
    )
    parser.add_argument("--output", default=str(RESULTS_DIR / f"{phase}.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    if any(s.dataset == "mnist" for s in args.scales) and not has_full_mnist(args.data_dir):
        parser.error(
            f"--data-dir {args.data_dir} holds no MNIST IDX files (scales on 'mnist' need them; "
            "set --data-dir or $FEDAUG_DATA_DIR)"
        )
    resources = {
        "cpus-per-client": args.cpus_per_client,
        "gpus-per-client": args.gpus_per_client,
        "total-cpus": args.total_cpus,
    }
    machine = machine_info()
    report = compare(
        phase,
        args.scales,
        args.rounds,
        args.repeats,
        resources,
        args.data_dir,
        parse_run_config(parser, "--run-config", args.run_config),
        args.loop_threads,
        getattr(args, "evaluate_messages", False),
        parse_run_config(parser, "--compare-run-config", args.compare_run_config),
    )
    report = {"benchmark": f"{phase}-round", "machine": machine, **report}
    report["load-average-at-end"] = load_average()
    print_table(
        f"{phase} round: Flower simulation vs plain sequential loop "
        f"(medians, {args.rounds} rounds x {args.repeats} repeats)",
        table_rows(report["results"]),
        list(table_rows(report["results"])[0]) if report["results"] else [],
    )
    save_results(args.output, report)
    return 0
