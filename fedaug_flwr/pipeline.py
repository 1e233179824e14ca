"""One run, server side: the three phases in order, then the results folder.

1. federated CVAE (skipped when nothing needs a generator),
2. imputation: every client generates its synthetic images once,
3. federated ExquisiteNet on the augmented data, evaluated every round on
   every client's real test split and on the global test set,
then a final per-client evaluation and ``summary.json``. The server only ever
sees models and numbers, never a client's images.

Clients may fail (an exception, missing data, a dead SuperNode): each failure
is logged and recorded, with the Flower node id, where it happened
(``failures`` of every round, of the imputation and of the final evaluation).
The run fails (``failure.json``, no summary) only when a training round or the
imputation gets fewer than ``min-clients`` answers: then a phase cannot
produce its model.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedaug_flwr import __version__
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import load_source, resolve_source
from fedaug_flwr.imputation import generate
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.models import CVAE, ExquisiteNetV1, count_parameters
from fedaug_flwr.plots import save_sample_grid
from fedaug_flwr.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_CLASSIFIER,
    GENERATOR,
    IMPUTE,
    METRICS,
    PARTITION_ID,
    TaskConfig,
)
from fedaug_flwr.results import FAILURE, SUMMARY, resolve_output_dir, save_state_dict, write_json
from fedaug_flwr.strategies import PhaseError, RoundLog, RoutedFedAvg, metric_dict, reply_failures
from fedaug_flwr.training import TensorData, evaluate_classifier

log = logging.getLogger("flwr.fedaug")  # printed by Flower's own log handler
SAMPLES_PER_LABEL = 10
NODE_ID = "node-id"  # the Flower node id of a SuperNode, as the server saw it
NODE_WAIT_S = 300.0


@dataclass
class RunReport:
    """Everything a run records, turned into ``summary.json`` at the end."""

    config: AppConfig
    run_id: int
    output_dir: Path
    started: float = field(default_factory=time.time)
    timing: dict[str, float] = field(default_factory=dict)
    sections: dict[str, object] = field(default_factory=dict)

    def timed(self, phase: str, work: Callable[[], object]) -> object:
        start = time.perf_counter()
        log.info("[fedaug] phase '%s' starts", phase)
        try:
            return work()
        finally:
            self.timing[phase] = round(time.perf_counter() - start, 3)
            log.info("[fedaug] phase '%s' took %.1f s", phase, self.timing[phase])

    def summary(self) -> dict:
        return {
            "status": "completed",
            "run-id": self.run_id,
            "fedaug-flwr-version": __version__,
            "started-at": _iso(self.started),
            "finished-at": _iso(time.time()),
            "output-dir": str(self.output_dir),
            "config": self.config.to_run_config(),
            **self.sections,
            "timing-s": {**self.timing, "total": round(time.time() - self.started, 3)},
        }


def run(grid: Grid, config: AppConfig, run_id: int) -> Path:
    """Run every phase and write the results folder; returns its path."""
    output_dir = resolve_output_dir(config.output_dir, run_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY, FAILURE):  # the folder must describe this run only
        (output_dir / stale).unlink(missing_ok=True)
    report = RunReport(config, run_id, output_dir)
    log.info("[fedaug] run %s writes its results to %s", run_id, output_dir)
    try:
        _run_phases(grid, report)
    except BaseException as error:
        write_json(
            output_dir / FAILURE,
            {
                # Ctrl-C reaches us as KeyboardInterrupt; after a SIGKILL nothing is written,
                # and a folder without summary.json is an incomplete run either way.
                "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                "run-id": run_id,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
                "config": config.to_run_config(),
                "timing-s": report.timing,
            },
        )
        log.error("[fedaug] RUN FAILED: %s (details in %s)", error, output_dir / FAILURE)
        raise
    write_json(output_dir / SUMMARY, report.summary())
    log.info("[fedaug] run completed; results in %s", output_dir)
    return output_dir


def _run_phases(grid: Grid, report: RunReport) -> None:
    config = report.config
    torch.manual_seed(config.seed)
    source, location, fallback = resolve_source(config.dataset, config.data_dir)
    data = report.timed("data", lambda: load_source(source, location))
    task = TaskConfig(config, data.source, location)
    node_ids = wait_for_nodes(grid, config.min_clients)
    report.sections["data"] = {
        "requested": config.dataset,
        "source": data.source,
        "location": data.location,
        "fallback-reason": fallback,
        "pool-size": len(data.pool),
        "global-test-size": len(data.test),
        "num-clients": len(node_ids),
    }

    cvae_weights = None
    if config.synthetic_per_client > 0:
        cvae_weights, cvae_section = report.timed("cvae", lambda: train_cvae(grid, task))
        report.sections["cvae"] = cvae_section
        save_state_dict(report.output_dir / "cvae.pt", cvae_weights)
        save_cvae_samples(cvae_weights, config, report.output_dir / "cvae_samples.png")
    else:
        report.sections["cvae"] = {"skipped": "imputation='none' or num-synthetic=0"}
        report.timing["cvae"] = 0.0

    impute_failures: list[dict] = []
    clients = report.timed(
        "imputation",
        lambda: impute_on_clients(grid, task, node_ids, cvae_weights, impute_failures),
    )
    report.sections["imputation"] = {
        "mode": config.imputation,
        "num-synthetic-per-client": config.synthetic_per_client,
        "total-synthetic": sum(c["synthetic-train"] for c in clients.values()),
        "failures": impute_failures,
    }

    global_test = TensorData.from_digits(data.test)
    classifier, classifier_section = report.timed(
        "classifier", lambda: train_classifier(grid, task, global_test)
    )
    report.sections["classifier"] = classifier_section
    save_state_dict(report.output_dir / "classifier.pt", classifier)

    final_failures: list[dict] = []
    final = report.timed(
        "final-evaluation",
        lambda: evaluate_on_clients(grid, task, node_ids, classifier, final_failures),
    )
    for partition_id, metrics in final.items():
        # a client that missed the imputation may still have been evaluated
        clients.setdefault(partition_id, {"partition-id": partition_id})["final-test"] = metrics
    report.sections["clients"] = [clients[pid] for pid in sorted(clients)]
    report.sections["final"] = {
        "clients": aggregate_clients(final.values()),
        "global-test": classifier_section["rounds"][-1]["global-test"],
        "failures": final_failures,
    }
    report.sections["artifacts"] = {
        "classifier": "classifier.pt",
        **({"cvae": "cvae.pt", "cvae-samples": "cvae_samples.png"} if cvae_weights else {}),
    }


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = NODE_WAIT_S) -> list[int]:
    """Node ids once at least ``minimum`` nodes are connected (they register asynchronously)."""
    deadline = time.monotonic() + timeout
    previous = -1
    while True:
        node_ids = sorted(grid.get_node_ids())
        # In simulation all nodes appear within a second; wait until the count settles.
        if len(node_ids) >= minimum and len(node_ids) == previous:
            return node_ids
        if time.monotonic() > deadline:
            raise PhaseError(
                f"only {len(node_ids)} SuperNodes connected after {timeout:.0f} s; "
                f"min-clients={minimum}"
            )
        previous = len(node_ids)
        time.sleep(1.0)


def _rounds(strategy: RoutedFedAvg, result, extra: Callable[[int], dict] | None = None) -> list:
    rows = []
    for server_round in sorted(strategy.train_log):
        row: dict = {
            "round": server_round,
            "train": metric_dict(result.train_metrics_clientapp.get(server_round, MetricRecord())),
            "train-per-client": strategy.train_log[server_round].per_client,
            "failures": strategy.train_log[server_round].failures,
        }
        evaluation: RoundLog | None = strategy.evaluate_log.get(server_round)
        if evaluation is not None:  # empty when no client could evaluate
            aggregated = result.evaluate_metrics_clientapp.get(server_round, MetricRecord())
            row["evaluate"] = metric_dict(aggregated)
            row["evaluate-per-client"] = evaluation.per_client
            row["failures"] = row["failures"] + evaluation.failures
        if extra is not None:
            row.update(extra(server_round))
        rows.append(row)
    return rows


def _strategy(config: AppConfig, action: str, evaluate: bool) -> RoutedFedAvg:
    return RoutedFedAvg(
        action,
        min_replies=config.min_clients,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate if evaluate else 0.0,
        min_train_nodes=config.min_clients,
        min_evaluate_nodes=config.min_clients if evaluate else 0,
        min_available_nodes=config.min_clients,
    )


def _require_model(result, phase: str) -> ArrayRecord:
    if len(result.arrays) == 0 or not result.train_metrics_clientapp:
        raise PhaseError(f"phase '{phase}' produced no aggregated model")
    return result.arrays


def train_cvae(grid: Grid, task: TaskConfig) -> tuple[dict, dict]:
    """Phase 1: FedAvg of the CVAE, weighted by client training-set size."""
    config = task.app
    strategy = _strategy(config, "cvae", evaluate=False)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(CVAE(config.cvae_latent_dim).state_dict()),
        num_rounds=config.cvae_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
    )
    weights = _require_model(result, "cvae").to_torch_state_dict()
    section = {
        "parameters": count_parameters(CVAE(config.cvae_latent_dim)),
        "rounds": _rounds(strategy, result),
    }
    return weights, section


def save_cvae_samples(weights: dict, config: AppConfig, path: Path) -> Path:
    cvae = CVAE(config.cvae_latent_dim)
    cvae.load_state_dict(weights)
    labels = np.repeat(np.arange(10), SAMPLES_PER_LABEL)
    images = generate(cvae, labels, seed=config.seed, batch_size=config.generation_batch_size)
    return save_sample_grid(images, SAMPLES_PER_LABEL, path)


def send_to_all(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: Callable[[], RecordDict],
    timeout: float,
    min_replies: int,
    failures: list[dict] | None = None,
) -> list[dict]:
    """Send one message per node, wait for the replies, return their metrics.

    Each answer also holds the replying ``node-id``. Error replies and nodes
    that did not answer within ``timeout`` are logged and added to ``failures``.
    """
    messages = [
        Message(content(), dst_node_id=node_id, message_type=message_type) for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = reply_failures(replies, messages, timeout)
    for failure in failed:
        log.warning("%s: node %s failed: %s", message_type, failure["node-id"], failure["reason"])
    if failures is not None:
        failures.extend(failed)
    answers = [
        {**metric_dict(r.content[METRICS]), NODE_ID: r.metadata.src_node_id}
        for r in replies
        if not r.has_error()
    ]
    if len(answers) < min_replies:
        reasons = sorted({failure["reason"] for failure in failed})
        raise PhaseError(
            f"{message_type}: only {len(answers)} of {len(node_ids)} clients answered "
            f"(need {min_replies}); client errors: {reasons}"
        )
    return answers


def impute_on_clients(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    cvae_weights: dict | None,
    failures: list[dict] | None = None,
) -> dict[int, dict]:
    """Phase 2: each client generates its synthetic images once and keeps them.

    Needs ``min-clients`` answers, from SuperNodes with distinct partition ids.
    """
    generator = ArrayRecord(
        cvae_weights if cvae_weights is not None else CVAE(task.app.cvae_latent_dim).state_dict()
    )

    def content() -> RecordDict:
        return RecordDict({GENERATOR: generator, CONFIG: task.to_record()})

    answers = send_to_all(
        grid, node_ids, IMPUTE, content, task.app.round_timeout, task.app.min_clients, failures
    )
    clients = {}
    for answer in answers:
        real, synthetic = answer["real-label-counts"], answer["synthetic-label-counts"]
        partition_id = int(answer[PARTITION_ID])
        if partition_id in clients:
            raise PhaseError(
                f"SuperNodes {clients[partition_id][NODE_ID]} and {answer[NODE_ID]} both have "
                f"partition-id {partition_id}: give every SuperNode its own partition-id"
            )
        clients[partition_id] = {
            "partition-id": partition_id,
            NODE_ID: answer[NODE_ID],
            "own-data": bool(answer.get("own-data", 0)),
            "real-train": int(answer["real-train"]),
            "val": int(answer["val"]),
            "test": int(answer["test"]),
            "synthetic-train": int(answer["synthetic-train"]),
            "label-counts-before": [int(c) for c in real],
            "label-counts-synthetic": [int(c) for c in synthetic],
            "label-counts-after": [int(a) + int(b) for a, b in zip(real, synthetic, strict=False)],
        }
    return clients


def global_evaluator(test: TensorData, batch_size: int):
    """Server-side evaluation of the global classifier on the global MNIST test set."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = ExquisiteNetV1()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate_classifier(model, test, batch_size))

    return evaluate


def train_classifier(grid: Grid, task: TaskConfig, global_test: TensorData) -> tuple[dict, dict]:
    """Phase 3: FedAvg of ExquisiteNet, evaluated on clients' real test splits every round."""
    config = task.app
    strategy = _strategy(config, "clf", evaluate=True)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(ExquisiteNetV1().state_dict()),
        num_rounds=config.clf_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
        evaluate_config=task.to_record(),
        evaluate_fn=global_evaluator(global_test, config.eval_batch_size),
    )
    weights = _require_model(result, "classifier").to_torch_state_dict()
    server_metrics = result.evaluate_metrics_serverapp

    def global_test_of(server_round: int) -> dict:
        return {"global-test": metric_dict(server_metrics[server_round])}

    section = {
        "parameters": count_parameters(ExquisiteNetV1()),
        "initial-global-test": metric_dict(server_metrics[0]),
        "rounds": _rounds(strategy, result, global_test_of),
    }
    return weights, section


def evaluate_on_clients(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    weights: dict,
    failures: list[dict] | None = None,
) -> dict[int, dict]:
    """The final model on every client's real test split, keyed by partition id.

    The model exists already: clients that fail here are recorded, never fatal.
    """
    arrays = ArrayRecord(weights)

    def content() -> RecordDict:
        return RecordDict({ARRAYS: arrays, CONFIG: task.to_record()})

    answers = send_to_all(
        grid, node_ids, EVALUATE_CLASSIFIER, content, task.app.round_timeout, 0, failures
    )
    for answer in answers:
        del answer[NODE_ID]
    return {int(a.pop(PARTITION_ID)): a for a in answers}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
