"""What travels between ServerApp and ClientApp: message types, record keys, replies.

One definition for both sides (and the benchmarks' ClientApps):

- the message types, which route to the ClientApp handler of that name;
- the record keys of a message and of its reply;
- one small dataclass per kind of reply (:class:`TrainAnswer`, :class:`RosterAnswer`,
  :class:`ImputationAnswer`, :class:`EvaluationAnswer`, :class:`LocalFinetuneAnswer`,
  :class:`PrivacyAnswer`), which turns into the reply's ``metrics`` record (and the
  server's reading of it back);
- helpers that read a message (:func:`read_task`, :func:`message_round`,
  :func:`wants_received_evaluation`) and build a reply (:func:`reply`).

The server sends the whole validated run config (plus the data source it
resolved) in every message, so a client never depends on ``context.run_config``
being filled in (``run_simulation`` leaves it empty) and every SuperNode sees
exactly what the server decided.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedaug_flwr.config import DATASETS, AppConfig, ConfigError
from fedaug_flwr.transport import to_record

# Message types: "<category>.<action>" routes to the ClientApp handler of that name.
TRAIN_CVAE = "train.cvae"
IMPUTE = "query.impute"
TRAIN_CLASSIFIER = "train.clf"
EVALUATE_CLASSIFIER = "evaluate.clf"
FINETUNE_LOCALLY = "train.local"  # fine-tune a copy, evaluate it, send back only metrics
PRIVACY_AUDIT = "query.privacy"  # audit the global CVAE on the client; statistics only
ROSTER = "query.roster"  # the node's partition id: the order rounds draw nodes in

# Records of a message and of its reply.
ARRAYS = "arrays"  # the model being trained / evaluated
GENERATOR = "generator"  # the frozen CVAE, for imputation
CONFIG = "config"
METRICS = "metrics"
# Evaluation on receipt (``evaluate-on-receipt``): a train message's config flag asking the
# client to evaluate the model it brings before training, and the reply's record of that.
EVALUATE_RECEIVED = "evaluate-received"
RECEIVED_EVALUATION = "received-evaluation"
SYNTHETIC_STATE = "synthetic"  # key in context.state: this node's synthetic images
GENERATOR_STATE = "generator"  # key in context.state: the global CVAE (synthetic-refresh)
SERVER_ROUND = "server-round"  # set by Flower's strategies in every message's config
# Flower's FedProx writes its proximal_mu into every train message's config under this key,
# which is also the run-config key: the client's proximal term reads that one value.
PROXIMAL_MU = "proximal-mu"

# Keys of a message's config record besides the run config.
DATA_SOURCE = "data-source"  # what the server resolved "dataset" to: one of DATASETS
DATA_LOCATION = "data-location"

# Keys of a reply's metrics record.
NUM_EXAMPLES = "num-examples"  # the client's FedAvg weight (train) or test images (evaluate)
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
TRAIN_EXAMPLES = "train-examples"
OWN_DATA = "own-data"
PARTITION_DRAWS = "partition-draws"
NUM_PARTITIONS = "num-partitions"
REAL_TRAIN = "real-train"
VAL = "val"
TEST = "test"
SYNTHETIC_TRAIN = "synthetic-train"
REAL_LABEL_COUNTS = "real-label-counts"
SYNTHETIC_LABEL_COUNTS = "synthetic-label-counts"
# Sample-level DP-SGD (cvae-dp = "sample"): what a train.cvae reply adds
# (fedaug_flwr.dp.PrivateTrainingResult.metrics); dp-epsilon is cumulative over rounds.
DP_METRICS = ("dp-epsilon", "dp-delta", "dp-noise", "dp-clip", "dp-sample-rate", "dp-steps")


@dataclass(frozen=True)
class TaskConfig:
    """What a client needs to know for any task: the run config and the data source."""

    app: AppConfig
    data_source: str
    data_location: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                **self.app.to_run_config(),
                DATA_SOURCE: self.data_source,
                DATA_LOCATION: self.data_location,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TaskConfig:
        """Rebuild and re-validate what the server sent; :class:`ConfigError` if it is bad."""
        values = dict(record)
        missing = [key for key in (DATA_SOURCE, DATA_LOCATION) if key not in values]
        if missing:
            raise ConfigError(f"message config lacks {missing}; the server always sends them")
        source, location = values.pop(DATA_SOURCE), values.pop(DATA_LOCATION)
        if source not in DATASETS or not isinstance(location, str):
            raise ConfigError(
                f"message config '{DATA_SOURCE}' must be one of {list(DATASETS)} and "
                f"'{DATA_LOCATION}' a string; got {source!r}, {location!r}"
            )
        values.pop(SERVER_ROUND, None)  # added by Flower strategies
        values.pop(EVALUATE_RECEIVED, None)  # added by RoutedFedAvg, read by the handler
        return cls(AppConfig.from_run_config(values), source, location)


# ------------------------------------------------------------------ reading a message


def read_task(msg: Message) -> TaskConfig:
    """The task a message carries; :class:`ConfigError` if it has none or a bad one."""
    if CONFIG not in msg.content.config_records:
        raise ConfigError(f"{msg.metadata.message_type} message lacks its '{CONFIG}' record")
    return TaskConfig.from_record(msg.content[CONFIG])


def message_round(msg: Message) -> int:
    """The round a message belongs to (0 outside a strategy's rounds, or without a config)."""
    if CONFIG not in msg.content.config_records:
        return 0
    return int(msg.content[CONFIG].get(SERVER_ROUND, 0))


def wants_received_evaluation(msg: Message) -> bool:
    """Whether a train message asks to evaluate the model it brings first (on receipt)."""
    return bool(msg.content[CONFIG].get(EVALUATE_RECEIVED, False))


def reply(msg: Message, metrics: Mapping[str, object], weights: Mapping | None = None) -> Message:
    """The reply to ``msg``: its ``metrics`` record and, for training, the new weights."""
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if weights is not None:
        content[ARRAYS] = to_record(weights)
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------ replies


@dataclass(frozen=True)
class TrainAnswer:
    """Reply to ``train.cvae`` and ``train.clf``, beside the new weights (``arrays``)."""

    partition_id: int
    num_examples: int  # the client's FedAvg weight (``fedavg-weights``)
    losses: Mapping[str, float]  # train-loss (and val-loss for the CVAE)

    def to_metrics(self) -> dict:
        return {**self.losses, NUM_EXAMPLES: self.num_examples, PARTITION_ID: self.partition_id}


@dataclass(frozen=True)
class RosterAnswer:
    """Reply to ``query.roster``: the partition the node holds (its ``partition-id``)."""

    partition_id: int

    def to_metrics(self) -> dict:
        return {PARTITION_ID: self.partition_id}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> RosterAnswer:
        return cls(partition_id=int(metrics[PARTITION_ID]))


@dataclass(frozen=True)
class ImputationAnswer:
    """Reply to ``query.impute``: the client's data sizes and label counts."""

    partition_id: int
    own_data: bool  # the node brought its own data (``data-path``)
    partition_draws: int  # Dirichlet splits drawn until every client was big enough
    num_partitions: int  # the partitions the node cut its pool into (all nodes must agree)
    real_train: int
    val: int
    test: int
    synthetic_train: int
    real_label_counts: list[int]
    synthetic_label_counts: list[int]

    def to_metrics(self) -> dict:
        return {
            PARTITION_ID: self.partition_id,
            OWN_DATA: int(self.own_data),
            PARTITION_DRAWS: self.partition_draws,
            NUM_PARTITIONS: self.num_partitions,
            REAL_TRAIN: self.real_train,
            VAL: self.val,
            TEST: self.test,
            SYNTHETIC_TRAIN: self.synthetic_train,
            REAL_LABEL_COUNTS: list(self.real_label_counts),
            SYNTHETIC_LABEL_COUNTS: list(self.synthetic_label_counts),
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> ImputationAnswer:
        return cls(
            partition_id=int(metrics[PARTITION_ID]),
            own_data=bool(metrics.get(OWN_DATA, 0)),
            partition_draws=int(metrics.get(PARTITION_DRAWS, 0)),
            num_partitions=int(metrics.get(NUM_PARTITIONS, 1)),
            real_train=int(metrics[REAL_TRAIN]),
            val=int(metrics[VAL]),
            test=int(metrics[TEST]),
            synthetic_train=int(metrics[SYNTHETIC_TRAIN]),
            real_label_counts=[int(c) for c in metrics[REAL_LABEL_COUNTS]],
            synthetic_label_counts=[int(c) for c in metrics[SYNTHETIC_LABEL_COUNTS]],
        )


@dataclass(frozen=True)
class EvaluationAnswer:
    """A classifier's metrics on the client's real test split: the reply to
    ``evaluate.clf``, and a ``train.clf`` reply's ``received-evaluation`` record."""

    partition_id: int
    num_examples: int  # test images
    metrics: Mapping[str, float]  # loss, accuracy, the F1 scores (fedaug_flwr.metrics)

    def to_metrics(self) -> dict:
        return {**self.metrics, NUM_EXAMPLES: self.num_examples, PARTITION_ID: self.partition_id}


@dataclass(frozen=True)
class LocalFinetuneAnswer:
    """Reply to ``train.local``: the fine-tuned copy's test metrics, and its training."""

    evaluation: EvaluationAnswer
    train_loss: float
    train_examples: int

    def to_metrics(self) -> dict:
        return {
            **self.evaluation.metrics,
            TRAIN_LOSS: self.train_loss,
            TRAIN_EXAMPLES: self.train_examples,
            NUM_EXAMPLES: self.evaluation.num_examples,
            PARTITION_ID: self.evaluation.partition_id,
        }


@dataclass(frozen=True)
class PrivacyAnswer:
    """Reply to ``query.privacy``: one client's memorization audit and membership attacks
    (:mod:`fedaug_flwr.privacy`), as counts, distances, shares and AUCs: never an image,
    never an index into the client's data, never a per-image score.

    ``audit`` is :func:`~fedaug_flwr.privacy.memorization_audit`'s dict, ``aucs`` each
    attack's AUC (an attack that could not be measured is left out).
    """

    partition_id: int
    audit: Mapping[str, object]
    members: int
    non_members: int
    aucs: Mapping[str, float]

    COUNTS = (
        "synthetic-images",
        "synthetic-unmatched",
        "train-images",
        "heldout-images",
        "reference-images",
        "flagged-images",
        "flagged-reference-images",
        "closer-to-train-images",
        "closer-to-train-reference-images",
        "exact-copies",
        "exact-copies-reference",
    )
    LISTS = (  # lists of numbers; the quantile lists are empty when nothing was measured
        "closest-train-distances",
        "closest-heldout-distances",
        "closest-train-distances-reference",
        "histogram-train",
        "histogram-heldout",
        "histogram-reference",
        "histogram-ratio",
        "histogram-ratio-reference",
        "ratio-quantiles",
        "ratio-quantiles-reference",
    )
    ATTACKS = ("loss", "generated-nearest")  # the attacks a client runs (no reference model)
    REQUIRED = (PARTITION_ID, *COUNTS, *LISTS, "reference-quantile", "members", "non-members")
    OPTIONAL = ("ratio-threshold", *(f"auc-{attack}" for attack in ATTACKS))

    def to_metrics(self) -> dict:
        audit = self.audit
        metrics: dict = {PARTITION_ID: self.partition_id}
        metrics |= {key: int(audit[key]) for key in self.COUNTS}
        for key in self.LISTS:
            value = audit[key]
            if isinstance(value, Mapping):  # ratio quantiles: p05 .. p95, in order
                value = list(value.values())
            metrics[key] = [] if value is None else list(value)
        metrics["reference-quantile"] = float(audit["reference-quantile"])
        if audit["ratio-threshold"] is not None:
            metrics["ratio-threshold"] = float(audit["ratio-threshold"])
        metrics |= {"members": self.members, "non-members": self.non_members}
        metrics |= {f"auc-{attack}": float(auc) for attack, auc in self.aucs.items()}
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> PrivacyAnswer:
        """The answer back from a reply's metrics (checked by ``replies.privacy_check``);
        ``audit`` then holds what :func:`~fedaug_flwr.privacy.aggregate_audits` reads."""
        audit: dict = {key: int(metrics[key]) for key in cls.COUNTS}
        audit |= {key: list(metrics[key]) for key in cls.LISTS}
        audit["reference-quantile"] = float(metrics["reference-quantile"])
        audit["ratio-threshold"] = metrics.get("ratio-threshold")
        for count, total, share in (
            ("flagged-images", "synthetic-images", "flagged-share"),
            ("flagged-reference-images", "reference-images", "flagged-share-reference"),
        ):
            audit[share] = audit[count] / audit[total] if audit[total] else None
        aucs = {a: float(metrics[f"auc-{a}"]) for a in cls.ATTACKS if f"auc-{a}" in metrics}
        return cls(
            int(metrics[PARTITION_ID]),
            audit,
            int(metrics["members"]),
            int(metrics["non-members"]),
            aucs,
        )
