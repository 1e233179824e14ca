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
    GENERATOR_STATE,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    RECEIVED_EVALUATION,
    SYNTHETIC_STATE,
    TaskConfig,
    server_round,
)
from fedaug_flwr.training import TensorData
from fedaug_flwr.transport import to_record, to_state_dict

# The mod is a no-op unless a test sets FEDAUG_TEST_FAULTS (see fedaug_flwr.faults).
app = ClientApp(mods=[fault_injection_mod])


@app.train("cvae")
def train_cvae(msg: Message, context: Context) -> Message:
    """Phase 1: local epochs of the CVAE on real training data."""
    task = _task(msg)
    split = _split(task, msg, context, node.TRAIN_SPLIT)
    weights, losses = node.train_cvae(task, split, to_state_dict(msg.content[ARRAYS]), _round(msg))
    metrics = {
        **losses,
        NUM_EXAMPLES: node.fedavg_weight(task, split),
        PARTITION_ID: split.partition_id,
    }
    return _reply(msg, metrics, weights)


@app.query("impute")
def impute(msg: Message, context: Context) -> Message:
    """Phase 2: generate k synthetic images with the global CVAE; keep them for phase 3.

    When the images are made anew every round (``synthetic-refresh``), the generator is
    kept instead, and these first images only report what a round's imputation gives.
    """
    task = _task(msg)
    split = _split(task, msg, context, node.TRAIN_SPLIT)
    node_config = node.parse_node_config(context.node_config)
    generator = to_state_dict(msg.content[GENERATOR])
    report = node.impute(task, split, generator)
    if task.app.synthetic_refresh == "every-round":
        context.state[GENERATOR_STATE] = msg.content[GENERATOR]
    else:
        context.state[SYNTHETIC_STATE] = ArrayRecord(
            {"images": Array(report.synthetic.images), "labels": Array(report.synthetic.labels)}
        )
    return _reply(
        msg,
        {
            PARTITION_ID: split.partition_id,
            "own-data": int(node_config.own_data),
            "partition-draws": split.draws,
            # the server checks that every SuperNode cuts the same partitions
            "num-partitions": node_config.num_partitions,
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
    task = _task(msg)
    received = to_state_dict(msg.content[ARRAYS])
    evaluation = None
    if _evaluate_received(msg):  # the received model is the previous round's
        test_split = _split(task, msg, context, node.EVALUATE_SPLIT, _round(msg) - 1)
        evaluation = _test_metrics(task, test_split, received)
    split = _split(task, msg, context, node.TRAIN_SPLIT)
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
    task = _task(msg)
    split = _split(task, msg, context, node.TRAIN_SPLIT)
    weights, loss, examples = _train_classifier(
        to_state_dict(msg.content[ARRAYS]),
        context,
        task,
        split,
        _round(msg),
        task.app.finetune_local_epochs,
    )
    test_split = _split(task, msg, context, node.EVALUATE_SPLIT)
    metrics = node.evaluate_on_test(task, test_split, weights)
    return _reply(
        msg,
        {
            **metrics,
            "train-loss": loss,
            "train-examples": examples,
            NUM_EXAMPLES: len(test_split.test),
            PARTITION_ID: split.partition_id,
        },
    )


@app.evaluate("clf")
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """Loss, accuracy, macro-F1 on this client's real (never imputed) test split."""
    task = _task(msg)
    split = _split(task, msg, context, node.EVALUATE_SPLIT)
    return _reply(msg, _test_metrics(task, split, to_state_dict(msg.content[ARRAYS])))


def _test_metrics(task: TaskConfig, split, weights: dict) -> dict:
    """What a client reports about a classifier: its metrics on the real test split."""
    metrics = node.evaluate_on_test(task, split, weights)
    return {**metrics, NUM_EXAMPLES: len(split.test), PARTITION_ID: split.partition_id}


def _train_classifier(
    weights: dict, context: Context, task: TaskConfig, split, server_round: int, epochs: int
):
    """Local epochs on the real training split plus this node's synthetic images;
    returns the weights, the loss and this client's FedAvg weight."""
    synthetic = _synthetic(task, split, context, server_round)
    parts = [split.train] if synthetic is None else [split.train, synthetic]
    training_set = TensorData.from_digits(*parts, device=node.device())
    weights, loss = node.train_classifier(
        task, training_set, weights, server_round, split.partition_id, epochs=epochs
    )
    synthetic_count = 0 if synthetic is None else len(synthetic)
    return weights, loss, node.fedavg_weight(task, split, synthetic_count)


def _synthetic(task: TaskConfig, split, context: Context, server_round: int) -> Digits | None:
    """This node's synthetic images for a round: those of the imputation phase, or, with
    ``synthetic-refresh`` every-round, new ones from the kept generator."""
    if task.app.synthetic_per_client == 0:
        return None
    if task.app.synthetic_refresh == "every-round":
        if GENERATOR_STATE not in context.state:
            raise RuntimeError("no generator on this node: the imputation phase did not run")
        generator = to_state_dict(context.state[GENERATOR_STATE])
        return node.impute(task, split, generator, server_round).synthetic
    if SYNTHETIC_STATE not in context.state:
        raise RuntimeError("no synthetic images on this node: the imputation phase did not run")
    record = context.state[SYNTHETIC_STATE]
    return node.synthetic_images(task, record["images"].numpy(), record["labels"].numpy())


def _task(msg: Message) -> TaskConfig:
    if CONFIG not in msg.content.config_records:
        raise ConfigError(f"{msg.metadata.message_type} message lacks its '{CONFIG}' record")
    return TaskConfig.from_record(msg.content[CONFIG])


def _split(
    task: TaskConfig, msg: Message, context: Context, purpose: int, server_round: int | None = None
):
    """This node's split for this message (drawn anew per round and purpose with
    ``client-split-refresh`` every-round, else the client's fixed split)."""
    server_round = _round(msg) if server_round is None else server_round
    reshuffle = node.reshuffle_key(task, server_round, purpose)
    return node.load_split(task, context.node_config, reshuffle)


def _round(msg: Message) -> int:
    return server_round(msg.content[CONFIG])


def _evaluate_received(msg: Message) -> bool:
    return bool(msg.content[CONFIG].get(EVALUATE_RECEIVED, False))


def _reply(msg: Message, metrics: dict, weights: dict | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if weights is not None:
        content[ARRAYS] = to_record(weights)
    return Message(content, reply_to=msg)
