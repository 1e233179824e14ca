"""ClientApp: one handler per message kind; the work itself is in fedaug_flwr.node.

Any exception in a handler (bad node config, missing data, ...) becomes an error
reply that the server records per round; the run goes on without this client
while at least min-clients answer.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedaug_flwr import node
from fedaug_flwr.config import ConfigError
from fedaug_flwr.data import Digits
from fedaug_flwr.faults import fault_injection_mod
from fedaug_flwr.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATE_RECEIVED,
    GENERATOR,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    RECEIVED_EVALUATION,
    SYNTHETIC_STATE,
    TaskConfig,
)
from fedaug_flwr.training import TensorData
from fedaug_flwr.transport import to_record, to_state_dict

# The mod is a no-op unless a test sets FEDAUG_TEST_FAULTS (see fedaug_flwr.faults).
app = ClientApp(mods=[fault_injection_mod])


@app.train("cvae")
def train_cvae(msg: Message, context: Context) -> Message:
    """Phase 1: local epochs of the CVAE on real training data."""
    task, split = _task_and_split(msg, context)
    weights, losses = node.train_cvae(task, split, to_state_dict(msg.content[ARRAYS]), _round(msg))
    metrics = {**losses, NUM_EXAMPLES: len(split.train), PARTITION_ID: split.partition_id}
    return _reply(msg, metrics, weights)


@app.query("impute")
def impute(msg: Message, context: Context) -> Message:
    """Phase 2: generate k synthetic images with the global CVAE; keep them for phase 3."""
    task, split = _task_and_split(msg, context)
    report = node.impute(task, split, to_state_dict(msg.content[GENERATOR]))
    context.state[SYNTHETIC_STATE] = ArrayRecord(
        {"images": Array(report.synthetic.images), "labels": Array(report.synthetic.labels)}
    )
    return _reply(
        msg,
        {
            PARTITION_ID: split.partition_id,
            "own-data": int(node.parse_node_config(context.node_config).own_data),
            "real-train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
            "synthetic-train": len(report.synthetic),
            "real-label-counts": report.real_label_counts,
            "synthetic-label-counts": report.synthetic_label_counts,
        },
    )


@app.train("clf")
def train_classifier(msg: Message, context: Context) -> Message:
    """Phase 3: local epochs of ExquisiteNet on real + synthetic training data.

    When the server asks (evaluation on receipt), the received global model is
    first evaluated on the real test split, as an ``evaluate.clf`` message would.
    """
    task, split = _task_and_split(msg, context)
    received = to_state_dict(msg.content[ARRAYS])
    evaluation = _test_metrics(task, split, received) if _evaluate_received(msg) else None
    weights, loss, examples = _train_classifier(
        received, context, task, split, _round(msg), task.app.classifier_local_epochs
    )
    metrics = {"train-loss": loss, NUM_EXAMPLES: examples}
    reply = _reply(msg, {**metrics, PARTITION_ID: split.partition_id}, weights)
    if evaluation is not None:
        reply.content[RECEIVED_EVALUATION] = MetricRecord(evaluation)
    return reply


@app.train("local")
def finetune_locally(msg: Message, context: Context) -> Message:
    """Finetune variant, local: fine-tune a private copy, report only its test metrics."""
    task, split = _task_and_split(msg, context)
    weights, loss, examples = _train_classifier(
        to_state_dict(msg.content[ARRAYS]),
        context,
        task,
        split,
        _round(msg),
        task.app.finetune_local_epochs,
    )
    metrics = node.evaluate_on_test(task, split, weights)
    return _reply(
        msg,
        {
            **metrics,
            "train-loss": loss,
            "train-examples": examples,
            NUM_EXAMPLES: len(split.test),
            PARTITION_ID: split.partition_id,
        },
    )


@app.evaluate("clf")
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """Loss, accuracy, macro-F1 on this client's real (never imputed) test split."""
    task, split = _task_and_split(msg, context)
    return _reply(msg, _test_metrics(task, split, to_state_dict(msg.content[ARRAYS])))


def _test_metrics(task: TaskConfig, split, weights: dict) -> dict:
    """What a client reports about a classifier: its metrics on the real test split."""
    metrics = node.evaluate_on_test(task, split, weights)
    return {**metrics, NUM_EXAMPLES: len(split.test), PARTITION_ID: split.partition_id}


def _train_classifier(
    weights: dict, context: Context, task: TaskConfig, split, server_round: int, epochs: int
):
    """Local epochs on the real training split plus this node's synthetic images."""
    training_set = _training_set(task, split, context)
    weights, loss = node.train_classifier(
        task, training_set, weights, server_round, split.partition_id, epochs=epochs
    )
    return weights, loss, len(training_set)


def _training_set(task: TaskConfig, split, context: Context) -> TensorData:
    """Real training split plus this node's synthetic images from the imputation phase."""
    parts = [split.train]
    if task.app.synthetic_per_client > 0:
        if SYNTHETIC_STATE not in context.state:
            raise RuntimeError("no synthetic images on this node: the imputation phase did not run")
        record = context.state[SYNTHETIC_STATE]
        parts.append(Digits(record["images"].numpy(), record["labels"].numpy()))
    return TensorData.from_digits(*parts, device=node.device())


def _task_and_split(msg: Message, context: Context):
    if CONFIG not in msg.content.config_records:
        raise ConfigError(f"{msg.metadata.message_type} message lacks its '{CONFIG}' record")
    task = TaskConfig.from_record(msg.content[CONFIG])
    return task, node.load_split(task, context.node_config)


def _round(msg: Message) -> int:
    return int(msg.content[CONFIG].get("server-round", 0))


def _evaluate_received(msg: Message) -> bool:
    return bool(msg.content[CONFIG].get(EVALUATE_RECEIVED, False))


def _reply(msg: Message, metrics: dict, weights: dict | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if weights is not None:
        content[ARRAYS] = to_record(weights)
    return Message(content, reply_to=msg)
