"""One run, server side: the phases in order (:func:`run_phases`), then the results folder.

1. federated CVAE (skipped when nothing needs a generator; with ``cvae-dp``
   differentially private), and what the server makes of it on its own: sample
   images, the generator-quality check and, in the finetune variant, a classifier
   pretrained on synthetic images; then the privacy audit on every client;
2. imputation: every client generates its synthetic images once;
3. federated ExquisiteNet on the augmented data, evaluated every round on every
   client's real test split and on the global test set (or, with
   ``pretrain='local'``, each client fine-tunes its own copy);

then a final per-client evaluation and ``summary.json``. The server only ever
sees models and numbers, never a client's images.

Where things are: the phases that talk to clients are in :mod:`fedaug_flwr.phases`,
the server's own work in :mod:`fedaug_flwr.server_work`, the record of the run
(``summary.json``, ``failure.json``) in :mod:`fedaug_flwr.run_record`. A run fails
(``failure.json``, no summary) only when a phase that makes a model gets fewer than
``min-clients`` answers, or its results cannot be written; other client failures are
recorded where they happened.

A run is resumable (:mod:`fedaug_flwr.checkpoint`): the steps marked
``record.step`` and every FedAvg round are checkpointed as they end. Started again
on the same folder, the run redoes what is cheap and deterministic (loading the
data, the imputation, which gives the clients their synthetic images back, the
evaluations of a finished model) and takes the rest from the checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid

from fedaug_flwr import phases, privacy_server, server_work
from fedaug_flwr.cluster import describe_cluster
from fedaug_flwr.config import AppConfig
from fedaug_flwr.data import MnistData, load_source, resolve_source
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.models import load_classifier
from fedaug_flwr.phases import Imputation, PerClient, Trained
from fedaug_flwr.protocol import PARTITION_ID, TaskConfig
from fedaug_flwr.replies import sizes_by_node
from fedaug_flwr.run_record import RunRecord
from fedaug_flwr.server_work import ServerWork
from fedaug_flwr.tracking import RunLog
from fedaug_flwr.training import TensorData, evaluate_classifier, seed_for

FINAL_MODEL = {"off": "federated", "federated": "finetuned", "local": "finetuned-locally"}
# The random stream (of the run seed) that picks the bn-recalibration-images sample.
BATCHNORM_SAMPLE_STREAM = 16


def run(grid: Grid, config: AppConfig, run_id: int) -> Path:
    """Run every phase and write the results folder; returns its path."""
    record = RunRecord.open(config, run_id)  # a folder that cannot take files fails here
    board = RunLog.for_run(config, record.output_dir)  # TensorBoard, when asked for
    try:
        record.resume()  # the folder's checkpoint, if any: refused when of another config
        run_phases(grid, record)
        cluster = describe_cluster()  # the Ray cluster a simulation ran on, else None
        if cluster is not None:
            record.add("ray-cluster", cluster)
    except BaseException as error:
        record.write_failure(error)
        raise
    finally:
        if board is not None:
            log_to_board(board, record)
    return record.write_summary()


def log_to_board(board: RunLog, record: RunRecord) -> None:
    """Every round of every phase the run got through, the config as hyper-parameters
    and the final metrics, into the run's TensorBoard files."""
    board.log_config(record.config.to_run_config())
    for phase in ("cvae", "classifier"):
        board.log_rounds(phase, (record.sections.get(phase) or {}).get("rounds", []))
    epochs = (record.sections.get("pretraining") or {}).get("epochs", [])
    board.log_rounds("pretraining", ({"round": e["epoch"], **e} for e in epochs))
    board.close(final_metrics=record.sections.get("final"))


def run_phases(grid: Grid, record: RunRecord) -> None:
    """The phases, top to bottom; each returns its section of the summary."""
    config, folder = record.config, record.output_dir
    # What draws from `random` on the server starts from the seed (the rounds' draws of
    # nodes are seeded per round: strategies.seeded_draw).
    random.seed(config.seed)
    source, location, fallback = resolve_source(config.dataset, config.data_dir)
    data = record.timed("data", lambda: load_source(source, location, config.binarized))
    task = TaskConfig(config, data.source, location)
    node_ids = phases.wait_for_nodes(grid, config.min_clients)
    if config.samples_nodes:  # rounds draw some nodes: the seed must fix which partitions
        grid = phases.listed_by_partition(grid, config, node_ids)
    global_test = TensorData.from_digits(data.test)
    calibration = batchnorm_calibration(data, config)  # None unless bn-recalibration-images

    # 1. the generator, and what the server makes of it on its own
    cvae = pretrained = None
    if config.trains_cvae:
        cvae = record.step("cvae", Trained, lambda: train_generator(grid, task, record), "cvae.pt")
    else:
        record.add("cvae", {"skipped": "no imputation and no pretraining"})
    if config.pretrain != "off":

        def pretrain() -> ServerWork:
            work = record.timed(
                "pretraining",
                lambda: server_work.pretrain_on_server(cvae.weights, config, global_test, folder),
            )
            record.keep(work.files)
            return work

        pretrained = record.step("pretraining", ServerWork, pretrain, "pretrained.pt")
    if cvae is not None and config.quality_samples > 0:

        def check_quality() -> ServerWork:
            quality = record.timed(
                "generator-quality",
                lambda: server_work.check_generator_quality(cvae.weights, config, data, folder),
            )
            record.add("generator-quality", quality.section)
            record.keep(quality.files)
            return quality

        record.step("generator-quality", ServerWork, check_quality)
    if cvae is not None:  # what the global CVAE reveals about the clients' training images
        skipped = privacy_server.audit_skipped(config)
        if skipped is None:

            def audit_privacy() -> ServerWork:
                audit = record.timed(
                    "privacy-audit",
                    lambda: phases.audit_on_clients(grid, task, node_ids, cvae.weights, folder),
                )
                record.add("privacy", audit.section)
                record.keep(audit.files)
                return audit

            record.step("privacy-audit", ServerWork, audit_privacy)
        else:
            record.add("privacy", {"skipped": skipped})

    # 2. imputation on the clients
    generator = cvae.weights if cvae else None
    imputation = record.timed(
        "imputation", lambda: phases.impute_on_clients(grid, task, node_ids, generator)
    )
    record.add("imputation", imputation.section)
    record.add("data", data_section(config, data, fallback, node_ids, imputation))
    sizes = sizes_by_node(imputation.clients)  # what each node may claim from now on

    # 3. the classifier: pretrained or fresh, federated or fine-tuned on each client alone
    if pretrained is not None:
        unchanged = record.timed(
            "pretrained-evaluation",
            lambda: phases.evaluate_on_clients(grid, task, node_ids, pretrained.weights, sizes),
        )
        record.add("pretraining", pretraining_section(pretrained, unchanged, global_test, config))
    classifier = None
    if config.pretrain == "local":
        final = record.timed(
            "local-finetuning",
            lambda: phases.finetune_locally(grid, task, node_ids, pretrained.weights, sizes),
        )
        record.add("classifier", {"skipped": "local fine-tuning: no aggregated model"})
    else:
        initial = pretrained.weights if pretrained else None

        def train_classifier() -> Trained:
            trained = record.timed(
                "classifier",
                lambda: phases.train_classifier(
                    grid,
                    task,
                    global_test,
                    initial,
                    sizes,
                    record.rounds("classifier"),
                    calibration,
                ),
            )
            record.add("classifier", trained.section)
            record.save_weights("classifier", trained.weights)
            return trained

        classifier = record.step("classifier", Trained, train_classifier, "classifier.pt")
        final = record.timed(
            "final-evaluation",
            lambda: phases.evaluate_on_clients(grid, task, node_ids, classifier.weights, sizes),
        )
    record.add("clients", client_rows(imputation, final))
    record.add("final", final_section(config, final, classifier))


def train_generator(grid: Grid, task: TaskConfig, record: RunRecord) -> Trained:
    """Phase 1: the federated CVAE, its weights and its samples in the results folder."""
    cvae = record.timed("cvae", lambda: phases.train_cvae(grid, task, record.rounds("cvae")))
    record.save_weights("cvae", cvae.weights)
    record.keep(
        {"cvae-samples": server_work.save_cvae_samples(cvae.weights, task.app, record.output_dir)}
    )
    record.add("cvae", cvae.section)
    return cvae


def data_section(
    config: AppConfig,
    data: MnistData,
    fallback: str,
    node_ids: list[int],
    imputation: Imputation,
) -> dict:
    """Where the data came from, its sizes, and the clients that took part."""
    return {
        "requested": config.dataset,
        "source": data.source,
        "location": data.location,
        "fallback-reason": fallback,
        "pool-size": len(data.pool),
        "global-test-size": len(data.test),
        "num-clients": len(node_ids),
        "binarized": config.binarized,
        "partition-draws": imputation.partition_draws,
    }


def batchnorm_calibration(data: MnistData, config: AppConfig) -> TensorData | None:
    """The real images the ``bn-recalibration-images`` diagnostic measures BatchNorm
    statistics on: a seeded sample of the client pool (all of it if it is smaller);
    ``None`` when the diagnostic is off."""
    size = min(config.bn_recalibration_images, len(data.pool))
    if size == 0:
        return None
    rng = np.random.default_rng(seed_for(config.seed, BATCHNORM_SAMPLE_STREAM))
    return TensorData.from_digits(
        data.pool.subset(np.sort(rng.choice(len(data.pool), size, False)))
    )


def client_rows(imputation: Imputation, final: PerClient) -> list[dict]:
    """Per client: what the imputation reported, and its final test metrics."""
    rows = {pid: dict(row) for pid, row in imputation.clients.items()}
    for partition_id, metrics in final.metrics.items():
        # a client that missed the imputation may still have been evaluated
        rows.setdefault(partition_id, {PARTITION_ID: partition_id})["final-test"] = metrics
    return [rows[pid] for pid in sorted(rows)]


def pretraining_section(
    pretrained: ServerWork, unchanged: PerClient, global_test: TensorData, config: AppConfig
) -> dict:
    """The server's pretraining, and its model's scores, unchanged, on every client."""
    model = load_classifier(pretrained.weights)
    scores = {
        **unchanged.section(),
        "global-test": evaluate_classifier(model, global_test, config.eval_batch_size),
    }
    return {**pretrained.section, "pretrained": scores}


def final_section(config: AppConfig, final: PerClient, classifier: Trained | None) -> dict:
    """The final model's metrics over the clients and on the global test set."""
    last = {} if classifier is None else classifier.section["rounds"][-1]
    section = {
        "model": FINAL_MODEL[config.pretrain],
        "clients": aggregate_clients(final.metrics.values()),
        "global-test": last.get("global-test"),
        "failures": final.failures,
    }
    if "global-test-recalibrated" in last:  # the bn-recalibration-images diagnostic
        section["global-test-recalibrated"] = last["global-test-recalibrated"]
    return section
