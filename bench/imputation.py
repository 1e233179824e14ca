"""Benchmark 3: batched imputation against generating one image at a time.

One client (partition 0 of 100 on full MNIST, else of 10 on mnist-5k) plans
k synthetic labels exactly as ``node.impute`` does, then the CVAE decodes them
in batches of ``generation-batch-size`` (the app's path) and one decoder call
per image (the reference). Both give the same images (checked); the CVAE's
weights are its seeded initial ones, which cost the same to run as trained ones.

The report also says why the ratio is what it is: the decoder's arithmetic
per image (multiply-adds of its linear layers) and weight bytes, the rates
both paths reach (GFLOP/s, and the weight bytes the one-at-a-time path must
re-read per image), and a ``torch.profiler`` table of one call of each path
(where the time goes: matrix products against everything else).

    python -m bench.imputation                   # k = 1000, 5 repeats, 1 torch thread
    python -m bench.imputation --k 500 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    RESULTS_DIR,
    default_data_dir,
    load_average,
    machine_info,
    print_table,
    ratio,
    save_results,
)
from fedaug_flwr import node
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import find_idx_folder
from fedaug_flwr.imputation import generate, generate_one_at_a_time, synthetic_labels
from fedaug_flwr.models import CVAE
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import seed_for, seeded


def client_labels(config: AppConfig, num_clients: int) -> np.ndarray:
    """The k labels partition 0 would ask for (its own label counts, the app's rule)."""
    task = TaskConfig(config, config.dataset, config.data_dir)
    split = node.load_split(task, {"partition-id": 0, "num-partitions": num_clients})
    rng = np.random.default_rng([config.seed, split.partition_id, 1])
    return synthetic_labels(
        config.imputation, config.synthetic_per_client, split.train.label_counts(), rng
    )


def timed(work) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process, and the result of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def decoder_cost(cvae: CVAE) -> dict:
    """Multiply-adds per image and weight bytes of the decoder's linear layers."""
    layers = [m for m in cvae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    macs = sum(layer.in_features * layer.out_features for layer in layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in cvae.decoder.parameters())
    return {"flop-per-image": 2 * macs, "weight-bytes": weight_bytes}


def profile_paths(paths: dict, top: int = 6) -> dict:
    """One call of each path under torch.profiler: the ops holding the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    tables = {}
    for name, work in paths.items():
        with profile(activities=activities, acc_events=True) as profiler:
            work()
        events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in events) or 1.0
        tables[name] = {
            "self-cpu-ms-total": round(total_us / 1000, 3),
            "top-ops": [
                {
                    "op": e.key,
                    "calls": e.count,
                    "self-cpu-ms": round(e.self_cpu_time_total / 1000, 3),
                    "share": round(e.self_cpu_time_total / total_us, 3),
                }
                for e in events[:top]
            ],
        }
    return tables


def measure(config: AppConfig, labels: np.ndarray, repeats: int) -> dict:
    run_on = node.device()
    cvae = CVAE(config.cvae_latent_dim)
    cvae.load_state_dict(seeded(config.seed, 1, lambda: CVAE(config.cvae_latent_dim)))
    seed = seed_for(config.seed, 0, 2)
    batch_size = config.generation_batch_size
    # warm-up: first calls allocate and pick kernels
    generate(cvae, labels[:64], seed, batch_size, run_on)
    generate_one_at_a_time(cvae, labels[:64], seed, run_on)
    paths = {
        "batched": lambda: generate(cvae, labels, seed, batch_size, run_on),
        "one-at-a-time": lambda: generate_one_at_a_time(cvae, labels, seed, run_on),
    }
    walls: dict[str, list[float]] = {name: [] for name in paths}
    cpus: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        images = []
        for name, work in paths.items():
            wall, cpu, result = timed(work)
            walls[name].append(wall)
            cpus[name].append(cpu)
            images.append(result)
        if not np.array_equal(*images):
            raise AssertionError("batched and one-at-a-time generation gave different images")
    k = len(labels)
    result = {
        "k": k,
        "generation-batch-size": batch_size,
        "device": str(run_on),
        "torch-threads": torch.get_num_threads(),
        "repeats": repeats,
        "same-images": True,
    }
    # Unrounded medians: a batched call on a GPU takes about a millisecond.
    wall = {name: statistics.median(walls[name]) for name in paths}
    cpu = {name: statistics.median(cpus[name]) for name in paths}
    for name in paths:
        result[name] = {
            "seconds": round(wall[name], 6),
            "seconds-all": [round(s, 6) for s in walls[name]],
            "cpu-seconds": round(cpu[name], 6),
            "images-per-second": ratio(k, wall[name]),
        }
    result["speed-up"] = ratio(wall["one-at-a-time"], wall["batched"])
    result["speed-up-cpu-time"] = ratio(cpu["one-at-a-time"], cpu["batched"])
    cost = decoder_cost(cvae)
    for name in paths:
        flop = k * cost["flop-per-image"]
        result[name]["decoder-gflop-per-s"] = round(flop / wall[name] / 1e9, 2)
    # One image per call multiplies vectors by the weights: every call re-reads them all.
    result["one-at-a-time"]["weight-gb-per-s"] = round(
        k * cost["weight-bytes"] / wall["one-at-a-time"] / 1e9, 2
    )
    result["decoder"] = cost
    result["profile"] = profile_paths(paths)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.imputation", description=__doc__)
    parser.add_argument("--k", type=int, default=1000, help="synthetic images for the client")
    parser.add_argument("--mode", choices=("minority", "uniform"), default="minority")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an actor has 1)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="full MNIST folder")
    parser.add_argument("--output", default=str(RESULTS_DIR / "imputation.json"))
    args = parser.parse_args(argv)
    if args.k < 1 or args.repeats < 1:
        parser.error("--k and --repeats must be >= 1")
    machine = machine_info()  # records torch's default threads, before the setting below
    torch.set_num_threads(args.threads)
    full_mnist = find_idx_folder(Path(args.data_dir)) is not None
    config = AppConfig.from_run_config(
        {
            "dataset": "mnist" if full_mnist else "mnist-5k",
            "data-dir": args.data_dir if full_mnist else "",
            "num-synthetic": args.k,
            "imputation": args.mode,
        }
    )
    num_clients = 100 if full_mnist else 10
    result = measure(config, client_labels(config, num_clients), args.repeats)
    result["client"] = f"partition 0 of {num_clients} on {config.dataset}"
    report = {"benchmark": "imputation", "machine": machine, **result}
    report["load-average-at-end"] = load_average()
    rows = [
        {
            "path": name,
            "seconds": result[name]["seconds"],
            "CPU seconds": result[name]["cpu-seconds"],
            "images/s": result[name]["images-per-second"],
        }
        for name in ("batched", "one-at-a-time")
    ]
    print_table(
        f"imputation of k={result['k']} images on one client ({result['client']}, "
        f"{result['device']}, {result['torch-threads']} thread(s), median of {args.repeats})",
        rows,
        list(rows[0]),
    )
    print(
        f"batched is {result['speed-up']}x faster ({result['speed-up-cpu-time']}x in CPU time); "
        f"identical images: {result['same-images']}"
    )
    cost = result["decoder"]
    print(
        f"decoder: {cost['flop-per-image'] / 1e6:.2f} MFLOP and {cost['weight-bytes'] / 1e6:.2f} "
        f"MB of weights per image; batched runs at "
        f"{result['batched']['decoder-gflop-per-s']} GFLOP/s, one-at-a-time at "
        f"{result['one-at-a-time']['decoder-gflop-per-s']} GFLOP/s "
        f"({result['one-at-a-time']['weight-gb-per-s']} GB/s of weights re-read)"
    )
    for name, table in result["profile"].items():
        print(f"profile of one {name} call ({table['self-cpu-ms-total']} ms self CPU in all):")
        for op in table["top-ops"]:
            share, ms, calls = op["share"], op["self-cpu-ms"], op["calls"]
            print(f"  {share:6.1%}  {ms:9.3f} ms  {calls:6d}x  {op['op']}")
    save_results(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
