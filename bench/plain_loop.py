"""The baseline: the app's three phases as a plain sequential PyTorch FedAvg loop.

One process, no Flower, no Ray: the clients take turns. It does the work the
Flower app does, with the app's own pieces: the same partitions
(``fedaug_flwr.partition.client_split`` through ``node.load_split``), the same
local training (``node.train_cvae``, ``node.train_classifier``: same seeds,
epochs, batches), the same imputation (``node.impute``), FedAvg weighted by
the same example counts, and the same evaluation (every client's real test
split, aggregated with ``metrics.aggregate_clients``, and the global test
set). The global models start from the ServerApp's initial weights, and
FedAvg sums the clients in partition order, as the app's strategy does, so
with one torch thread (the actors' setting) the metrics come out the same.

What it does *not* repeat is the per-message bookkeeping of a federated
client: it derives each client's split once and keeps every client's tensors
in memory, as a plain loop naturally would. Threads: torch's default (all
cores) unless ``--threads`` says otherwise.

    python -m bench.plain_loop --num-clients 10 --run-config '{"clf-rounds": 2}' --output x.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from fedaug_flwr import node
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import Digits, load_source, resolve_source
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.models import CVAE, ExquisiteNetV1
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.results import write_json
from fedaug_flwr.training import TensorData, evaluate_classifier, seeded

StateDict = Mapping[str, torch.Tensor]


def fedavg(updates: list[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts, weights = example counts, in the order given.

    The same arithmetic as Flower's FedAvg (``count / total`` factors, float32
    products summed one client after the other).
    """
    total = float(sum(count for _, count in updates))
    averaged: dict[str, np.ndarray] = {}
    for weights, count in updates:
        factor = count / total
        for key, tensor in weights.items():
            value = tensor.detach().cpu().numpy() * factor
            if key in averaged:
                averaged[key] += value
            else:
                averaged[key] = value
    # Integer buffers (BatchNorm's num_batches_tracked) are averaged as floats,
    # as Flower does; load_state_dict casts them back.
    return {key: torch.from_numpy(np.asarray(value)) for key, value in averaged.items()}


class Stopwatch:
    """Named spans of one round, in seconds, plus the round's total."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.spans: dict[str, float] = {}

    def timed(self, name: str, work: Callable[[], object]) -> object:
        begin = time.perf_counter()
        try:
            return work()
        finally:
            self.spans[name] = round(time.perf_counter() - begin, 3)

    def report(self) -> dict[str, float]:
        return {**self.spans, "total": round(time.perf_counter() - self.start, 3)}


def initial_models(config: AppConfig) -> tuple[dict, dict]:
    """The ServerApp's initial CVAE and classifier weights (seeded by the run seed only)."""
    return (
        seeded(config.seed, 1, lambda: CVAE(config.cvae_latent_dim)),
        seeded(config.seed, 2, ExquisiteNetV1),
    )


def run_plain(config: AppConfig, num_clients: int, skip_classifier: bool = False) -> dict:
    """All phases for ``num_clients`` clients, one after the other; timings and metrics."""
    if config.pretrain != "off":
        raise ValueError(
            f"the plain loop reproduces runs with pretrain='off' only; got {config.pretrain!r}"
        )
    if config.synthetic_refresh != "once" or config.client_split_refresh != "once":
        raise ValueError(
            "the plain loop makes the synthetic images and the client splits once; run it with "
            "synthetic-refresh='once' and client-split-refresh='once'"
        )
    timing: dict = {}
    run_on = node.device()  # the GPU when there is one, as the app's clients
    begin = time.perf_counter()
    source, location, _ = resolve_source(config.dataset, config.data_dir)
    data = load_source(source, location)
    task = TaskConfig(config, data.source, location)
    splits = [
        node.load_split(task, {"partition-id": pid, "num-partitions": num_clients})
        for pid in range(num_clients)
    ]
    global_test = TensorData.from_digits(data.test, device=run_on)
    test_sets = [TensorData.from_digits(split.test, device=run_on) for split in splits]
    cvae_weights, classifier_weights = initial_models(config)
    timing["setup"] = round(time.perf_counter() - begin, 3)

    cvae_rounds, cvae_timing = [], []
    if config.synthetic_per_client > 0:
        for server_round in range(1, config.cvae_rounds + 1):
            watch = Stopwatch()

            def train_all(weights=cvae_weights, server_round=server_round):
                return [
                    (
                        node.train_cvae(task, split, weights, server_round)[0],
                        node.fedavg_weight(task, split),
                    )
                    for split in splits
                ]

            updates = watch.timed("train", train_all)
            cvae_weights = watch.timed("aggregate", lambda updates=updates: fedavg(updates))
            cvae_rounds.append(
                {
                    "round": server_round,
                    "train": {"num-examples": sum(len(split.train) for split in splits)},
                }
            )
            cvae_timing.append({"round": server_round, **watch.report()})

    begin = time.perf_counter()
    training_sets, fedavg_weights = [], []
    for split in splits:
        parts: list[Digits] = [split.train]
        if config.synthetic_per_client > 0:
            parts.append(node.impute(task, split, cvae_weights).synthetic)
        training_sets.append(TensorData.from_digits(*parts, device=run_on))
        synthetic = len(training_sets[-1]) - len(split.train)
        fedavg_weights.append(node.fedavg_weight(task, split, synthetic))
    timing["imputation"] = round(time.perf_counter() - begin, 3)

    classifier_rounds, classifier_timing = [], []
    model = ExquisiteNetV1().to(run_on)
    for server_round in range(1, 0 if skip_classifier else config.clf_rounds + 1):
        watch = Stopwatch()

        def train_all(weights=classifier_weights, server_round=server_round):
            return [
                (
                    node.train_classifier(
                        task, data_set, weights, server_round, pid, config.classifier_local_epochs
                    )[0],
                    fedavg_weights[pid],
                )
                for pid, data_set in enumerate(training_sets)
            ]

        updates = watch.timed("train", train_all)
        classifier_weights = watch.timed("aggregate", lambda updates=updates: fedavg(updates))
        model.load_state_dict(classifier_weights)

        def evaluate_all():
            rows = []
            for test in test_sets:
                metrics = evaluate_classifier(model, test, config.eval_batch_size)
                rows.append({**metrics, "num-examples": len(test)})
            return aggregate_clients(rows)

        evaluation = watch.timed("evaluate", evaluate_all)
        global_test_metrics = watch.timed(
            "global-evaluate",
            lambda: evaluate_classifier(model, global_test, config.eval_batch_size),
        )
        classifier_rounds.append(
            {
                "round": server_round,
                "train": {"num-examples": sum(len(t) for t in training_sets)},
                "evaluate": evaluation,
                "global-test": global_test_metrics,
            }
        )
        classifier_timing.append({"round": server_round, **watch.report()})
    return {
        "num-clients": num_clients,
        "torch-threads": torch.get_num_threads(),
        "device": str(run_on),
        "data-source": data.source,
        "timing-s": timing,
        "cvae": {"rounds": cvae_rounds, "round-timing-s": cvae_timing},
        "classifier": {"rounds": classifier_rounds, "round-timing-s": classifier_timing},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_loop")
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--run-config", default="{}", help="JSON object of run-config values")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--output", required=True, help="JSON file for the timings")
    parser.add_argument(
        "--skip-classifier", action="store_true", help="stop after the CVAE phase and imputation"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = AppConfig.from_run_config(json.loads(args.run_config))
    write_json(Path(args.output), run_plain(config, args.num_clients, args.skip_classifier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
