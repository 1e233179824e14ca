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

import hashlib
import logging
import random
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

from fedaug_flwr import __version__, federation
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import Digits, MnistData, load_source, resolve_source
from fedaug_flwr.fidelity import feature_fidelity
from fedaug_flwr.imputation import generate
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.models import CVAE, ExquisiteNetV1, count_parameters
from fedaug_flwr.plots import save_probability_histograms, save_sample_grid
from fedaug_flwr.presets import matching_preset
from fedaug_flwr.pretrain import evaluation_curve, synthetic_mnist, train_on_synthetic
from fedaug_flwr.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_CLASSIFIER,
    FINETUNE_LOCALLY,
    GENERATOR,
    IMPUTE,
    METRICS,
    PARTITION_ID,
    TaskConfig,
)
from fedaug_flwr.quality import (
    REFERENCE_NOTE,
    fidelity_sample,
    gap,
    generator_quality,
    label_matched_sample,
    reference_scores,
)
from fedaug_flwr.replies import (
    TEST,
    NodeSizes,
    ReplyRules,
    imputation_check,
    partition_count_problem,
    screen,
    sizes_by_node,
)
from fedaug_flwr.results import FAILURE, SUMMARY, resolve_output_dir, save_state_dict, write_json
from fedaug_flwr.strategies import (
    PhaseError,
    RoundLog,
    RoutedFedAvg,
    in_partition_order,
    metric_dict,
    reply_failures,
    routed_strategy,
    sender_of,
)
from fedaug_flwr.training import TensorData, evaluate_classifier, seed_for
from fedaug_flwr.transport import to_state_dict

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
            "study-preset": matching_preset(self.config.to_run_config()),
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
    random.seed(config.seed)  # Flower strategies sample nodes with `random`
    source, location, fallback = resolve_source(config.dataset, config.data_dir)
    data = report.timed("data", lambda: load_source(source, location, config.binarized))
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
        "binarized": config.binarized,
    }

    artifacts = report.sections.setdefault("artifacts", {})
    cvae_weights = None
    if config.trains_cvae:
        cvae_weights, cvae_section = report.timed("cvae", lambda: train_cvae(grid, task))
        report.sections["cvae"] = cvae_section
        artifacts["cvae"] = save_state_dict(report.output_dir / "cvae.pt", cvae_weights).name
        samples = save_cvae_samples(cvae_weights, config, report.output_dir / "cvae_samples.png")
        artifacts["cvae-samples"] = samples.name
    else:
        report.sections["cvae"] = {"skipped": "no imputation and no pretraining"}

    global_test = TensorData.from_digits(data.test)
    pretrained = None
    if config.pretrain != "off":
        pretrained = report.timed(
            "pretraining", lambda: pretrain_on_server(report, cvae_weights, global_test)
        )
    if cvae_weights is not None and config.quality_samples > 0:
        report.timed(
            "generator-quality", lambda: quick_generator_quality(report, cvae_weights, data)
        )

    impute_failures: list[dict] = []
    clients = report.timed(
        "imputation",
        lambda: impute_on_clients(grid, task, node_ids, cvae_weights, impute_failures),
    )
    sizes = sizes_by_node(clients)  # what each node may claim from now on
    draws = sorted({int(c["partition-draws"]) for c in clients.values() if not c["own-data"]})
    report.sections["data"]["partition-draws"] = draws[0] if len(draws) == 1 else draws
    report.sections["imputation"] = {
        "mode": config.imputation,
        "refresh": config.synthetic_refresh,
        "num-synthetic-per-client": config.synthetic_per_client,
        "total-synthetic": sum(c["synthetic-train"] for c in clients.values()),
        "failures": impute_failures,
    }

    if pretrained is not None:
        pretrained_failures: list[dict] = []
        unchanged = report.timed(
            "pretrained-evaluation",
            lambda: evaluate_on_clients(
                grid, task, node_ids, pretrained, pretrained_failures, sizes
            ),
        )
        report.sections["pretraining"]["pretrained"] = {
            "failures": pretrained_failures,
            "clients": aggregate_clients(unchanged.values()),
            "per-client": [{PARTITION_ID: pid, **unchanged[pid]} for pid in sorted(unchanged)],
            "global-test": evaluate_classifier(
                _classifier(pretrained), global_test, config.eval_batch_size
            ),
        }

    final_failures: list[dict] = []
    if config.pretrain == "local":
        final = report.timed(
            "local-finetuning",
            lambda: finetune_locally(grid, task, node_ids, pretrained, final_failures, sizes),
        )
        report.sections["classifier"] = {"skipped": "local fine-tuning: no aggregated model"}
        final_global_test = None
    else:
        classifier, classifier_section = report.timed(
            "classifier", lambda: train_classifier(grid, task, global_test, pretrained, sizes)
        )
        report.sections["classifier"] = classifier_section
        artifacts["classifier"] = save_state_dict(
            report.output_dir / "classifier.pt", classifier
        ).name
        final = report.timed(
            "final-evaluation",
            lambda: evaluate_on_clients(grid, task, node_ids, classifier, final_failures, sizes),
        )
        final_global_test = classifier_section["rounds"][-1]["global-test"]

    for partition_id, metrics in final.items():
        # a client that missed the imputation may still have been evaluated
        clients.setdefault(partition_id, {"partition-id": partition_id})["final-test"] = metrics
    report.sections["clients"] = [clients[pid] for pid in sorted(clients)]
    report.sections["final"] = {
        "model": {"off": "federated", "federated": "finetuned", "local": "finetuned-locally"}[
            config.pretrain
        ],
        "clients": aggregate_clients(final.values()),
        "global-test": final_global_test,
        "failures": final_failures,
    }


def pretrain_on_server(report: RunReport, cvae_weights: dict, global_test: TensorData) -> dict:
    """Finetune variant: generate an MNIST-sized synthetic set and train ExquisiteNet on it."""
    config = report.config
    synthetic = synthetic_mnist(
        _cvae(cvae_weights, config), config.pretrain_samples, config.seed,
        config.generation_batch_size, config.synthetic_binarize,
    )  # fmt: skip
    synthetic_test = TensorData.from_digits(synthetic.test)
    curve, record_epoch = evaluation_curve(
        global_test, synthetic_test, config.pretrain_epochs, config.eval_batch_size
    )
    model = train_on_synthetic(
        synthetic.train, config.pretrain_epochs, config.pretrain_lr,
        config.pretrain_weight_decay, config.pretrain_batch_size, config.seed,
        on_epoch=record_epoch,
    )  # fmt: skip
    weights = model.state_dict()
    artifacts = report.sections["artifacts"]
    artifacts["pretrained"] = save_state_dict(report.output_dir / "pretrained.pt", weights).name
    report.sections["pretraining"] = {
        "mode": config.pretrain,
        "samples": {"train": len(synthetic.train), "test": len(synthetic.test)},
        "label-counts-train": synthetic.train.label_counts(),
        "epochs": curve,
        "weights-sha256": weights_digest(weights),
    }
    description = (
        f"the pretrained ExquisiteNetV1 ({len(synthetic.train)} synthetic images, "
        f"{config.pretrain_epochs} epochs)"
    )
    quality = _scores_and_histograms(
        report, model, global_test, synthetic_test, description, "pretrained-probability-histograms"
    )
    report.sections["pretraining"]["quality"] = quality
    log.info(
        "[fedaug] pretrained model: real-test accuracy %.3f, macro-F1 %.3f "
        "(synthetic-test accuracy %.3f)",
        quality["real-test"]["accuracy"], quality["real-test"]["macro-f1"],
        quality["synthetic-test"]["accuracy"],
    )  # fmt: skip
    return weights


def quick_generator_quality(report: RunReport, cvae_weights: dict, data: MnistData) -> None:
    """Train-on-synthetic / test-on-real with a small fixed classifier, beside a reference
    trained the same way on as many real pool images, and the Fréchet distance and coverage
    of synthetic against real test images in the reference's features (``quality``,
    ``fidelity``). The reference uses real training images on the server, which a real
    deployment would not have: a measurement aid, said so in the summary's ``note``."""
    config = report.config
    cvae = _cvae(cvae_weights, config)
    synthetic = synthetic_mnist(
        cvae,
        config.quality_samples,
        config.seed,
        config.generation_batch_size,
        config.synthetic_binarize,
    )
    rng = np.random.default_rng(seed_for(config.seed, 14))
    real_train, repeats = label_matched_sample(data.pool, synthetic.train.label_counts(), rng)

    def fit(train_set: Digits) -> ExquisiteNetV1:
        # one budget for both: as many images, the same epochs, optimizer settings and seed
        return train_on_synthetic(
            train_set, config.quality_epochs, config.clf_lr, config.clf_weight_decay,
            config.clf_batch_size, config.seed,
        )  # fmt: skip

    model, reference = fit(synthetic.train), fit(real_train)
    images, epochs = len(synthetic.train), config.quality_epochs
    real_test, synthetic_test = (
        TensorData.from_digits(data.test), TensorData.from_digits(synthetic.test)
    )  # fmt: skip
    quality = _scores_and_histograms(
        report, model, real_test, synthetic_test,
        f"ExquisiteNetV1 trained on {images} synthetic images for {epochs} epochs "
        "(quality-samples, quality-epochs)",
        "probability-histograms",
    )  # fmt: skip
    quality["note"] = REFERENCE_NOTE
    quality["reference"] = reference_scores(
        reference, real_test, synthetic_test, config.eval_batch_size,
        f"the same ExquisiteNetV1 trained on {images} real pool images for {epochs} epochs",
        real_train, repeats,
    )  # fmt: skip
    quality["gap"] = gap(quality, quality["reference"])
    real = fidelity_sample(data.test, rng)
    generated = generate(
        cvae,
        real.labels,
        seed_for(config.seed, 15),
        config.generation_batch_size,
        binarize=config.synthetic_binarize,
    )
    quality["fidelity"] = feature_fidelity(
        reference,
        real,
        Digits(generated, real.labels, grey=not config.binarized),
        config.eval_batch_size,
    )
    report.sections["generator-quality"] = quality
    coverage = quality["fidelity"]["coverage"]
    log.info(
        "[fedaug] generator quality: real-test accuracy %.3f trained on synthetic vs %.3f on "
        "real (gap %.3f, macro-F1 gap %.3f); Frechet distance %.2f, coverage %.3f",
        quality["real-test"]["accuracy"], quality["reference"]["real-test"]["accuracy"],
        quality["gap"]["accuracy"], quality["gap"]["macro-f1"],
        quality["fidelity"]["frechet-distance"], float("nan") if coverage is None else coverage,
    )  # fmt: skip


def _scores_and_histograms(
    report: RunReport, model, real_test, synthetic_test, description: str, artifact: str
) -> dict:
    """A synthetic-trained classifier's scores; its probability histograms as ``artifact``."""
    quality = generator_quality(
        model, real_test, synthetic_test, report.config.eval_batch_size, description
    )
    path = report.output_dir / f"{artifact.replace('-', '_')}.png"
    report.sections["artifacts"][artifact] = save_probability_histograms(quality, path).name
    return quality


def wait_for_nodes(grid: Grid, minimum: int, timeout: float | None = None) -> list[int]:
    """Node ids once at least ``minimum`` nodes are connected (see :mod:`federation`)."""
    return federation.wait_for_nodes(grid, minimum, NODE_WAIT_S if timeout is None else timeout)


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


def _strategy(
    config: AppConfig, action: str, evaluate: bool, sizes: dict[int, NodeSizes] | None = None
) -> RoutedFedAvg:
    return routed_strategy(
        config.clf_aggregation if action == "clf" else "fedavg",
        action,
        trim_fraction=config.clf_trim_fraction,
        krum_malicious=config.clf_krum_malicious,
        sizes=sizes,
        min_replies=config.min_clients,
        evaluate_on_receipt=evaluate and config.evaluate_on_receipt,
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
        initial_arrays=ArrayRecord(seeded(config.seed, 1, lambda: CVAE(config.cvae_latent_dim))),
        num_rounds=config.cvae_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
    )
    weights = to_state_dict(_require_model(result, "cvae"))
    section = {
        "parameters": count_parameters(CVAE(config.cvae_latent_dim)),
        "rounds": _rounds(strategy, result),
        "round-timing-s": strategy.timing_table(),
    }
    return weights, section


def save_cvae_samples(weights: dict, config: AppConfig, path: Path) -> Path:
    cvae = _cvae(weights, config)
    labels = np.repeat(np.arange(10), SAMPLES_PER_LABEL)
    images = generate(
        cvae,
        labels,
        seed=config.seed,
        batch_size=config.generation_batch_size,
        binarize=config.synthetic_binarize,
    )
    return save_sample_grid(images, SAMPLES_PER_LABEL, path)


def send_to_all(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: Callable[[], RecordDict],
    timeout: float,
    min_replies: int,
    failures: list[dict] | None = None,
    check: Callable[[Message, int], str | None] | None = None,
) -> list[dict]:
    """Send one message per node, wait for the replies, return their metrics.

    Answers come in partition order, each with the replying ``node-id``. Error replies, replies
    that fail ``check`` (why a reply from a node cannot count, or ``None``) and nodes that did
    not answer within ``timeout`` are logged and added to ``failures``.
    """
    messages = [
        Message(content(), dst_node_id=node_id, message_type=message_type) for node_id in node_ids
    ]
    # in partition order: sums over clients (e.g. the final metrics) are then repeatable
    replies = in_partition_order(grid.send_and_receive(messages, timeout=timeout))
    failed = reply_failures(replies, messages, timeout)
    if check is not None:
        replies, rejected = screen(replies, check, sender_of(messages))
        failed += rejected
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
        grid, node_ids, IMPUTE, content, task.app.round_timeout, task.app.min_clients, failures,
        imputation_check(task.app.synthetic_per_client),
    )  # fmt: skip
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
            "own-data": bool(answer["own-data"]),
            "partition-draws": int(answer["partition-draws"]),
            "num-partitions": int(answer["num-partitions"]),
            "real-train": int(answer["real-train"]),
            "val": int(answer["val"]),
            "test": int(answer["test"]),
            "synthetic-train": int(answer["synthetic-train"]),
            "label-counts-before": [int(c) for c in real],
            "label-counts-synthetic": [int(c) for c in synthetic],
            "label-counts-after": [int(a) + int(b) for a, b in zip(real, synthetic, strict=False)],
        }
    if (problem := partition_count_problem(clients)) is not None:
        raise PhaseError(problem)
    return clients


def global_evaluator(test: TensorData, batch_size: int):
    """Server-side evaluation of the global classifier on the global MNIST test set."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = _classifier(to_state_dict(arrays))
        return MetricRecord(evaluate_classifier(model, test, batch_size))

    return evaluate


def train_classifier(
    grid: Grid,
    task: TaskConfig,
    global_test: TensorData,
    initial: dict | None = None,
    sizes: dict[int, NodeSizes] | None = None,
) -> tuple[dict, dict]:
    """Phase 3: FedAvg of ExquisiteNet (from ``initial`` weights, e.g. pretrained, or fresh),
    evaluated on the clients' real test splits every round."""
    config = task.app
    initial = initial if initial is not None else seeded(config.seed, 2, ExquisiteNetV1)
    strategy = _strategy(config, "clf", evaluate=True, sizes=sizes)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=config.classifier_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
        evaluate_config=task.to_record(),
        evaluate_fn=global_evaluator(global_test, config.eval_batch_size),
    )
    weights = to_state_dict(_require_model(result, "classifier"))
    server_metrics = result.evaluate_metrics_serverapp

    def global_test_of(server_round: int) -> dict:
        return {"global-test": metric_dict(server_metrics[server_round])}

    section = {
        "parameters": count_parameters(ExquisiteNetV1()),
        "local-epochs": config.classifier_local_epochs,
        "initial-weights-sha256": weights_digest(initial),
        "initial-global-test": metric_dict(server_metrics[0]),
        "federated-evaluation": strategy.federated_evaluation,
        "aggregation": strategy.aggregation,
        "rounds": _rounds(strategy, result, global_test_of),
        "round-timing-s": strategy.timing_table(),
    }
    return weights, section


def per_client_with_model(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    weights: dict,
    message_type: str,
    min_replies: int,
    failures: list[dict],
    sizes: dict[int, NodeSizes] | None = None,
) -> dict[int, dict]:
    """Send a classifier to every client for ``message_type``; their metrics by partition id.

    These messages belong to no round (server-round 0): a client whose split is drawn
    anew every round (``client-split-refresh``) draws the split of round 0 for them.
    """
    arrays = ArrayRecord(weights)

    def content() -> RecordDict:
        return RecordDict({ARRAYS: arrays, CONFIG: task.to_record()})

    rules = ReplyRules(message_type, sizes, counts=TEST)
    answers = send_to_all(
        grid, node_ids, message_type, content, task.app.round_timeout, min_replies, failures,
        rules.problem,
    )  # fmt: skip
    for answer in answers:
        del answer[NODE_ID]
    return {int(a.pop(PARTITION_ID)): a for a in answers}


def evaluate_on_clients(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    weights: dict,
    failures: list[dict],
    sizes: dict[int, NodeSizes] | None = None,
) -> dict[int, dict]:
    """A classifier, unchanged, on every client's real test split.

    The model exists already: clients that fail here are recorded, never fatal.
    """
    return per_client_with_model(
        grid, task, node_ids, weights, EVALUATE_CLASSIFIER, 0, failures, sizes
    )


def finetune_locally(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    pretrained: dict,
    failures: list[dict],
    sizes: dict[int, NodeSizes] | None = None,
) -> dict[int, dict]:
    """Each client fine-tunes its own copy of the pretrained model; nothing is aggregated."""
    return per_client_with_model(
        grid, task, node_ids, pretrained, FINETUNE_LOCALLY, task.app.min_clients, failures, sizes
    )


def weights_digest(weights: dict) -> str:
    """SHA-256 over a state dict's tensors, to show which weights a phase started from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cvae(weights: dict, config: AppConfig) -> CVAE:
    model = CVAE(config.cvae_latent_dim)
    model.load_state_dict(weights)
    return model


def _classifier(weights: dict) -> ExquisiteNetV1:
    model = ExquisiteNetV1()
    model.load_state_dict(weights)
    return model


def seeded(seed: int, phase: int, build: Callable[[], torch.nn.Module]) -> dict:
    """Initial weights that depend on the run seed only."""
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(seed, phase))
        return build().state_dict()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
