"""The phases that talk to clients: each sends its messages through the Grid and
returns what it made with its section of ``summary.json``.

- :func:`train_cvae` (phase 1) and :func:`train_classifier` (phase 3): rounds of
  FedAvg (:class:`~fedaug_flwr.strategies.RoutedFedAvg`);
- :func:`audit_on_clients` (after phase 1): one ``query.privacy`` message per client,
  statistics back (:mod:`fedaug_flwr.privacy_server` pools them);
- :func:`impute_on_clients` (phase 2): one ``query.impute`` message per client;
- :func:`evaluate_on_clients` and :func:`finetune_locally`: a model sent once to
  every client, outside any round;
- :func:`listed_by_partition` (before phase 1, when rounds draw some of the nodes): one
  ``query.roster`` message per client, its partition id back;
- :func:`send_to_all`, the one-message-per-client exchange under the last four.

Clients may fail (an exception, missing data, a dead SuperNode): each failure is
logged and recorded, with the Flower node id, in the phase's ``failures``. A
phase raises :class:`~fedaug_flwr.strategies.PhaseError` only when fewer than
``min-clients`` answer where it needs them to produce its model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedaug_flwr import federation, log, privacy_server
from fedaug_flwr.config import AppConfig
from fedaug_flwr.metrics import aggregate_clients
from fedaug_flwr.models import (
    CVAE,
    ExquisiteNetV1,
    count_parameters,
    load_classifier,
    weights_digest,
)
from fedaug_flwr.plots import save_privacy_distances
from fedaug_flwr.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_CLASSIFIER,
    FINETUNE_LOCALLY,
    GENERATOR,
    IMPUTE,
    METRICS,
    NUM_PARTITIONS,
    OWN_DATA,
    PARTITION_DRAWS,
    PARTITION_ID,
    PRIVACY_AUDIT,
    REAL_TRAIN,
    ROSTER,
    SYNTHETIC_TRAIN,
    TEST,
    VAL,
    ImputationAnswer,
    PrivacyAnswer,
    RosterAnswer,
    TaskConfig,
)
from fedaug_flwr.replies import (
    NodeSizes,
    ReplyRules,
    imputation_check,
    partition_count_problem,
    privacy_check,
    roster_check,
    screen,
)
from fedaug_flwr.server_work import ServerWork
from fedaug_flwr.strategies import (
    PhaseError,
    RoundHooks,
    RoundLog,
    RoutedFedAvg,
    in_partition_order,
    metric_dict,
    reply_failures,
    routed_strategy,
    sender_of,
)
from fedaug_flwr.training import (
    TensorData,
    evaluate_classifier,
    seeded,
    with_recalibrated_batchnorm,
)
from fedaug_flwr.transport import to_state_dict

NODE_ID = "node-id"  # the Flower node id of a SuperNode, as the server saw it
NODE_WAIT_S = 300.0
PRIVACY_FIGURE = "privacy_distances.png"


@dataclass
class Trained:
    """A federated model and its section of the summary."""

    weights: dict
    section: dict


@dataclass
class Imputation:
    """What each client reported about its data (by partition id), and the phase's section."""

    clients: dict[int, dict]
    section: dict

    @property
    def partition_draws(self) -> int | list[int]:
        """The Dirichlet draws the clients needed (a list if they disagree)."""
        clients = self.clients.values()
        draws = sorted({c[PARTITION_DRAWS] for c in clients if not c[OWN_DATA]})
        return draws[0] if len(draws) == 1 else draws


@dataclass
class PerClient:
    """One model's metrics on every client that answered (by partition id), and failures."""

    metrics: dict[int, dict]
    failures: list[dict]

    def section(self) -> dict:
        return {
            "failures": self.failures,
            "clients": aggregate_clients(self.metrics.values()),
            "per-client": [
                {PARTITION_ID: pid, **self.metrics[pid]} for pid in sorted(self.metrics)
            ],
        }


def wait_for_nodes(grid: Grid, minimum: int, timeout: float | None = None) -> list[int]:
    """Node ids once at least ``minimum`` nodes are connected (see :mod:`federation`)."""
    return federation.wait_for_nodes(grid, minimum, NODE_WAIT_S if timeout is None else timeout)


def listed_by_partition(grid: Grid, config: AppConfig, node_ids: list[int]) -> Grid:
    """``grid`` listing its nodes by the partition each holds, asked once (``query.roster``),
    so that a seed draws the same partitions every round whatever ids the nodes got (see
    :mod:`federation`). Nodes that do not answer are listed last; fewer than
    ``min-clients`` answers raise :class:`PhaseError`."""
    answers, _ = send_to_all(
        grid, node_ids, ROSTER, RecordDict, config.round_timeout, config.min_clients, roster_check
    )
    partitions = {
        answer[NODE_ID]: RosterAnswer.from_metrics(answer).partition_id for answer in answers
    }
    log.info(
        "[fedaug] rounds draw some of the %d nodes: listed by partition (%s: %d answered)",
        len(node_ids),
        ROSTER,
        len(partitions),
    )
    return federation.PartitionOrderedGrid(grid, partitions)


# ------------------------------------------------------------------ FedAvg phases


def train_cvae(grid: Grid, task: TaskConfig, hooks: RoundHooks | None = None) -> Trained:
    """Phase 1: FedAvg of the CVAE, weighted by client training-set size (from the round
    after ``hooks.resume`` when the run resumes; ``hooks.after_round`` after each round)."""
    config = task.app
    hooks = hooks or RoundHooks()
    strategy = _strategy(config, "cvae", evaluate=False, num_clients=len(grid.get_node_ids()))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(seeded(config.seed, 1, lambda: CVAE(config.cvae_latent_dim))),
        num_rounds=config.cvae_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
        resume=hooks.resume,
        after_round=hooks.after_round,
    )
    weights = to_state_dict(_require_model(result, "cvae"))
    section = {
        "parameters": count_parameters(CVAE(config.cvae_latent_dim)),
        "rounds": _rounds(strategy, result),
        "round-timing-s": strategy.timing_table(),
        "dp": privacy_server.dp_section(config, strategy),
    }
    return Trained(weights, section)


def train_classifier(
    grid: Grid,
    task: TaskConfig,
    global_test: TensorData,
    initial: dict | None = None,
    sizes: dict[int, NodeSizes] | None = None,
    hooks: RoundHooks | None = None,
    calibration: TensorData | None = None,
) -> Trained:
    """Phase 3: FedAvg of ExquisiteNet (from ``initial`` weights, e.g. pretrained, or fresh),
    evaluated on the clients' real test splits every round and on the global test set.
    ``sizes`` (from the imputation) bound what each client may claim in its replies;
    ``hooks``: the run's checkpoint, as for :func:`train_cvae`; ``calibration``: images
    to score each global model again with BatchNorm statistics measured on them
    (``bn-recalibration-images``)."""
    config = task.app
    hooks = hooks or RoundHooks()
    initial = initial if initial is not None else seeded(config.seed, 2, ExquisiteNetV1)
    strategy = _strategy(config, "clf", evaluate=True, sizes=sizes)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=config.classifier_rounds,
        timeout=config.round_timeout,
        train_config=task.to_record(),
        evaluate_config=task.to_record(),
        evaluate_fn=global_evaluator(global_test, config.eval_batch_size, calibration),
        resume=hooks.resume,
        after_round=hooks.after_round,
    )
    weights = to_state_dict(_require_model(result, "classifier"))
    server_metrics = result.evaluate_metrics_serverapp

    def global_test_of(server_round: int, name: str = "global-test") -> dict:
        return split_recalibrated(metric_dict(server_metrics[server_round]), name)

    section = {
        "parameters": count_parameters(ExquisiteNetV1()),
        "local-epochs": config.classifier_local_epochs,
        "initial-weights-sha256": weights_digest(initial),
        **global_test_of(0, "initial-global-test"),
        "federated-evaluation": strategy.federated_evaluation,
        "aggregation": strategy.aggregation,
        "strategy": {"name": strategy.strategy, **strategy.parameters()},
        "rounds": _rounds(strategy, result, global_test_of),
        "round-timing-s": strategy.timing_table(),
    }
    if calibration is not None:
        section["bn-recalibration"] = {
            "images": len(calibration),
            "from": "a seeded sample of the data set's training images (labels unused)",
        }
    return Trained(weights, section)


# The server's global-test metrics of the model with re-measured BatchNorm statistics carry
# this prefix in its MetricRecord (one record per round), and their own entry in the summary.
RECALIBRATED = "recalibrated-"


def global_evaluator(test: TensorData, batch_size: int, calibration: TensorData | None = None):
    """Server-side evaluation of the global classifier on the global test set; with
    ``calibration``, also of a copy whose BatchNorm statistics are measured on it
    (:func:`~fedaug_flwr.training.with_recalibrated_batchnorm`)."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = load_classifier(to_state_dict(arrays))
        metrics = evaluate_classifier(model, test, batch_size)
        if calibration is not None:
            recalibrated = with_recalibrated_batchnorm(model, calibration, batch_size)
            scores = evaluate_classifier(recalibrated, test, batch_size)
            metrics.update({f"{RECALIBRATED}{key}": value for key, value in scores.items()})
        return MetricRecord(metrics)

    return evaluate


def split_recalibrated(metrics: dict, name: str = "global-test") -> dict:
    """``{name: the model's own scores}``, and ``{name}-recalibrated`` where the round also
    scored the model with re-measured BatchNorm statistics."""
    own = {k: v for k, v in metrics.items() if not k.startswith(RECALIBRATED)}
    recalibrated = {
        k.removeprefix(RECALIBRATED): v for k, v in metrics.items() if k.startswith(RECALIBRATED)
    }
    return {name: own, **({f"{name}-recalibrated": recalibrated} if recalibrated else {})}


def _strategy(
    config: AppConfig,
    action: str,
    evaluate: bool,
    sizes: dict[int, NodeSizes] | None = None,
    num_clients: int = 0,
) -> RoutedFedAvg:
    """FedAvg of ``action`` (or, for the classifier, the robust rule ``clf-aggregation`` or
    the server strategy ``clf-strategy``; for the CVAE, the one ``cvae-dp`` asks for, see
    :mod:`fedaug_flwr.privacy_server`); without ``evaluate`` (the CVAE) it has no
    evaluation rounds."""

    def build() -> RoutedFedAvg:
        if action == "cvae":
            return privacy_server.cvae_strategy(config, num_clients, **arguments)
        return routed_strategy(
            config.clf_aggregation,
            action,
            trim_fraction=config.clf_trim_fraction,
            krum_malicious=config.clf_krum_malicious,
            strategy=config.clf_strategy if action == "clf" else "fedavg",
            strategy_parameters=strategy_parameters(config) if action == "clf" else None,
            # a server optimizer steps the weights; BatchNorm's statistics are averaged
            averaged=[name for name, _ in ExquisiteNetV1().named_buffers()] if evaluate else (),
            **arguments,
        )

    arguments = dict(
        sizes=sizes,
        min_replies=config.min_clients,
        evaluate_on_receipt=evaluate and config.evaluate_on_receipt,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate if evaluate else 0.0,
        min_train_nodes=config.min_clients,
        min_evaluate_nodes=config.min_clients if evaluate else 0,
        min_available_nodes=config.min_clients,
        draw_seed=config.seed,  # with the round, fixes which nodes a round draws
    )
    if evaluate:
        return build()
    # Flower warns "fraction_evaluate is set to 0.0" for a strategy built without evaluation,
    # which reads as if the user's fraction-evaluate (the classifier's) were ignored.
    with _dropped(logging.getLogger("flwr"), "fraction_evaluate is set to 0.0"):
        return build()


def strategy_parameters(config: AppConfig) -> dict[str, float]:
    """The keyword arguments of the Flower strategy ``clf-strategy`` names, from its keys."""
    return {
        "fedavg": {},
        "fedprox": {"proximal_mu": config.proximal_mu},
        "fedavgm": {
            "server_learning_rate": config.clf_fedavgm_lr,
            "server_momentum": config.clf_fedavgm_momentum,
        },
        "fedadam": {
            "eta": config.clf_fedadam_eta,
            "tau": config.clf_fedadam_tau,
            "beta_1": config.clf_fedadam_beta1,
            "beta_2": config.clf_fedadam_beta2,
        },
    }[config.clf_strategy]


@contextmanager
def _dropped(logger: logging.Logger, message_start: str) -> Iterator[None]:
    """Within the block, ``logger`` drops records whose message starts with ``message_start``."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(message_start)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _require_model(result, phase: str) -> ArrayRecord:
    if len(result.arrays) == 0 or not result.train_metrics_clientapp:
        raise PhaseError(f"phase '{phase}' produced no aggregated model")
    return result.arrays


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


# ------------------------------------------------------------------ one message per client


def send_to_all(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: Callable[[], RecordDict],
    timeout: float,
    min_replies: int,
    check: Callable[[Message, int], str | None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Send one message per node, wait for the replies; their metrics, and the failures.

    Answers come in partition order, each with the replying ``node-id``. Error replies,
    replies that fail ``check`` (why a reply from a node cannot count, or ``None``) and
    nodes that did not answer within ``timeout`` are logged and returned as failures;
    fewer than ``min_replies`` answers raise :class:`PhaseError`.
    """
    messages = [
        Message(content(), dst_node_id=node_id, message_type=message_type) for node_id in node_ids
    ]
    # in partition order: sums over clients (e.g. the final metrics) are then repeatable
    replies = in_partition_order(grid.send_and_receive(messages, timeout=timeout))
    failures = reply_failures(replies, messages, timeout)
    if check is not None:
        replies, rejected = screen(replies, check, sender_of(messages))
        failures += rejected
    for failure in failures:
        log.warning("%s: node %s failed: %s", message_type, failure["node-id"], failure["reason"])
    answers = [
        {**metric_dict(r.content[METRICS]), NODE_ID: r.metadata.src_node_id}
        for r in replies
        if not r.has_error()
    ]
    if len(answers) < min_replies:
        reasons = sorted({failure["reason"] for failure in failures})
        raise PhaseError(
            f"{message_type}: only {len(answers)} of {len(node_ids)} clients answered "
            f"(need {min_replies}); client errors: {reasons}"
        )
    return answers, failures


def audit_on_clients(
    grid: Grid, task: TaskConfig, node_ids: list[int], cvae_weights: dict, folder: Path
) -> ServerWork:
    """After phase 1: every client audits the global CVAE (``query.privacy``) and answers
    with statistics only; they are pooled into the ``privacy`` section and the distance
    distributions drawn. The CVAE exists already: failing clients are recorded, never fatal."""
    generator = ArrayRecord(cvae_weights)

    def content() -> RecordDict:
        return RecordDict({GENERATOR: generator, CONFIG: task.to_record()})

    answers, failures = send_to_all(
        grid, node_ids, PRIVACY_AUDIT, content, task.app.round_timeout, 0, privacy_check
    )
    section = privacy_server.privacy_section(
        [PrivacyAnswer.from_metrics(answer) for answer in answers], failures
    )
    files = {}
    if section["audit"].get("clients", 0) > 0:
        files["privacy-distances"] = save_privacy_distances(section, folder / PRIVACY_FIGURE)
    return ServerWork(section, files)


def impute_on_clients(
    grid: Grid, task: TaskConfig, node_ids: list[int], cvae_weights: dict | None
) -> Imputation:
    """Phase 2: each client generates its synthetic images once and keeps them.

    Needs ``min-clients`` answers, from SuperNodes with distinct partition ids.
    """
    config = task.app
    generator = ArrayRecord(
        cvae_weights if cvae_weights is not None else CVAE(config.cvae_latent_dim).state_dict()
    )

    def content() -> RecordDict:
        return RecordDict({GENERATOR: generator, CONFIG: task.to_record()})

    answers, failures = send_to_all(
        grid,
        node_ids,
        IMPUTE,
        content,
        config.round_timeout,
        config.min_clients,
        imputation_check(config.synthetic_per_client),
    )
    clients = {}
    for answer in answers:
        reported = ImputationAnswer.from_metrics(answer)
        partition_id = reported.partition_id
        if partition_id in clients:
            raise PhaseError(
                f"SuperNodes {clients[partition_id][NODE_ID]} and {answer[NODE_ID]} both have "
                f"partition-id {partition_id}: give every SuperNode its own partition-id"
            )
        clients[partition_id] = client_row(reported, answer[NODE_ID])
    if (problem := partition_count_problem(clients)) is not None:
        raise PhaseError(problem)
    section = {
        "mode": config.imputation,
        "refresh": config.synthetic_refresh,
        "num-synthetic-per-client": config.synthetic_per_client,
        "total-synthetic": sum(c[SYNTHETIC_TRAIN] for c in clients.values()),
        "failures": failures,
    }
    return Imputation(clients, section)


def client_row(answer: ImputationAnswer, node_id: int) -> dict:
    """A client's entry in the summary's ``clients``: its data, before the final metrics."""
    real, synthetic = answer.real_label_counts, answer.synthetic_label_counts
    return {
        PARTITION_ID: answer.partition_id,
        NODE_ID: node_id,
        OWN_DATA: answer.own_data,
        PARTITION_DRAWS: answer.partition_draws,
        NUM_PARTITIONS: answer.num_partitions,
        REAL_TRAIN: answer.real_train,
        VAL: answer.val,
        TEST: answer.test,
        SYNTHETIC_TRAIN: answer.synthetic_train,
        "label-counts-before": real,
        "label-counts-synthetic": synthetic,
        "label-counts-after": [a + b for a, b in zip(real, synthetic, strict=False)],
    }


def evaluate_on_clients(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    weights: dict,
    sizes: dict[int, NodeSizes] | None = None,
) -> PerClient:
    """A classifier, unchanged, on every client's real test split.

    The model exists already: clients that fail here are recorded, never fatal.
    """
    return _per_client_with_model(grid, task, node_ids, weights, EVALUATE_CLASSIFIER, 0, sizes)


def finetune_locally(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    pretrained: dict,
    sizes: dict[int, NodeSizes] | None = None,
) -> PerClient:
    """Each client fine-tunes its own copy of the pretrained model; nothing is aggregated."""
    return _per_client_with_model(
        grid, task, node_ids, pretrained, FINETUNE_LOCALLY, task.app.min_clients, sizes
    )


def _per_client_with_model(
    grid: Grid,
    task: TaskConfig,
    node_ids: list[int],
    weights: dict,
    message_type: str,
    min_replies: int,
    sizes: dict[int, NodeSizes] | None = None,
) -> PerClient:
    """Send a classifier to every client for ``message_type``; their metrics by partition id.

    These messages belong to no round (server-round 0): a client whose split is drawn
    anew every round (``client-split-refresh``) draws the split of round 0 for them.
    """
    arrays = ArrayRecord(weights)

    def content() -> RecordDict:
        return RecordDict({ARRAYS: arrays, CONFIG: task.to_record()})

    rules = ReplyRules(message_type, sizes, counts=TEST)
    answers, failures = send_to_all(
        grid, node_ids, message_type, content, task.app.round_timeout, min_replies, rules.problem
    )
    for answer in answers:
        del answer[NODE_ID]
    return PerClient({int(a.pop(PARTITION_ID)): a for a in answers}, failures)
