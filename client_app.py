"""ClientApp: one handler per message kind; the work itself is in fedaug_flwr.node.

Each handler reads its task from the message, does the node's work and answers
with the reply of :mod:`fedaug_flwr.protocol` for that message kind.

Any exception in a handler (bad node config, missing data, ...) becomes an error
reply that the server records per round; the run goes on without this client
while at least min-clients answer.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedaug_flwr import node
from fedaug_flwr.data import Digits
from fedaug_flwr.faults import fault_injection_mod
from fedaug_flwr.partition import ClientSplit
from fedaug_flwr.protocol import (
    ARRAYS,
    GENERATOR,
    GENERATOR_STATE,
    RECEIVED_EVALUATION,
    SYNTHETIC_STATE,
    TRAIN_LOSS,
    EvaluationAnswer,
    ImputationAnswer,
    LocalFinetuneAnswer,
    PrivacyAnswer,
    RosterAnswer,
    TaskConfig,
    TrainAnswer,
    message_round,
    read_task,
    reply,
    wants_received_evaluation,
)
from fedaug_flwr.training import TensorData
from fedaug_flwr.transport import to_state_dict

# The mod is a no-op unless a test sets FEDAUG_TEST_FAULTS (see fedaug_flwr.faults).
app = ClientApp(mods=[fault_injection_mod])


@app.query("roster")
def report_partition(msg: Message, context: Context) -> Message:
    """Before the first round, when rounds draw some of the nodes: the partition this node
    holds, by which the server lists the nodes it draws from."""
    node_config = node.parse_node_config(context.node_config)
    return reply(msg, RosterAnswer(node_config.partition_id).to_metrics())


@app.train("cvae")
def train_cvae(msg: Message, context: Context) -> Message:
    """Phase 1: local epochs of the CVAE on real training data."""
    task = read_task(msg)
    split = message_split(task, msg, context, node.TRAIN_SPLIT)
    server_round = message_round(msg)
    weights, losses = node.train_cvae(task, split, to_state_dict(msg.content[ARRAYS]), server_round)
    answer = TrainAnswer(split.partition_id, node.cvae_weight(task, split), losses)
    return reply(msg, answer.to_metrics(), weights)


@app.query("privacy")
def audit_privacy(msg: Message, context: Context) -> Message:
    """After phase 1: what the global CVAE reveals about this client's training images
    (memorization audit, membership attacks); only statistics go back."""
    task = read_task(msg)
    split = message_split(task, msg, context, node.TRAIN_SPLIT)
    audit, attacks = node.audit_privacy(task, split, to_state_dict(msg.content[GENERATOR]))
    answer = PrivacyAnswer(
        partition_id=split.partition_id,
        audit=audit,
        members=attacks["members"],
        non_members=attacks["non-members"],
        aucs={
            name: result["auc"]
            for name, result in attacks["attacks"].items()
            if result["auc"] is not None
        },
    )
    return reply(msg, answer.to_metrics())


@app.query("impute")
def impute(msg: Message, context: Context) -> Message:
    """Phase 2: generate k synthetic images with the global CVAE; keep them for phase 3.

    When the images are made anew every round (``synthetic-refresh``), the generator is
    kept instead, and these first images only report what a round's imputation gives.
    """
    task = read_task(msg)
    split = message_split(task, msg, context, node.TRAIN_SPLIT)
    node_config = node.parse_node_config(context.node_config)
    generator = to_state_dict(msg.content[GENERATOR])
    report = node.impute(task, split, generator)
    if task.app.synthetic_refresh == "every-round":
        context.state[GENERATOR_STATE] = msg.content[GENERATOR]
    else:
        context.state[SYNTHETIC_STATE] = ArrayRecord(
            {"images": Array(report.synthetic.images), "labels": Array(report.synthetic.labels)}
        )
    answer = ImputationAnswer(
        partition_id=split.partition_id,
        own_data=node_config.own_data,
        partition_draws=split.draws,
        # the server checks that every SuperNode cuts the same partitions
        num_partitions=node_config.num_partitions,
        real_train=len(split.train),
        val=len(split.val),
        test=len(split.test),
        synthetic_train=len(report.synthetic),
        real_label_counts=report.real_label_counts,
        synthetic_label_counts=report.synthetic_label_counts,
    )
    return reply(msg, answer.to_metrics())


@app.train("clf")
def train_classifier(msg: Message, context: Context) -> Message:
    """Phase 3: local epochs of ExquisiteNet on real + synthetic training data.

    When the server asks (evaluation on receipt), the received global model is
    first evaluated on the real test split, as an ``evaluate.clf`` message would.
    """
    task = read_task(msg)
    server_round = message_round(msg)
    received = to_state_dict(msg.content[ARRAYS])
    evaluation = None
    if wants_received_evaluation(msg):  # the received model is the previous round's
        test_split = message_split(task, msg, context, node.EVALUATE_SPLIT, server_round - 1)
        evaluation = evaluation_answer(task, test_split, received)
    split = message_split(task, msg, context, node.TRAIN_SPLIT)
    weights, loss, examples = train_on_node(
        received, context, task, split, server_round, task.app.classifier_local_epochs
    )
    answer = TrainAnswer(split.partition_id, examples, {TRAIN_LOSS: loss})
    message = reply(msg, answer.to_metrics(), weights)
    if evaluation is not None:
        message.content[RECEIVED_EVALUATION] = MetricRecord(evaluation.to_metrics())
    return message


@app.train("local")
def finetune_locally(msg: Message, context: Context) -> Message:
    """Finetune variant, local: fine-tune a private copy, report only its test metrics."""
    task = read_task(msg)
    split = message_split(task, msg, context, node.TRAIN_SPLIT)
    weights, loss, examples = train_on_node(
        to_state_dict(msg.content[ARRAYS]),
        context,
        task,
        split,
        message_round(msg),
        task.app.finetune_local_epochs,
    )
    test_split = message_split(task, msg, context, node.EVALUATE_SPLIT)
    answer = LocalFinetuneAnswer(evaluation_answer(task, test_split, weights), loss, examples)
    return reply(msg, answer.to_metrics())


@app.evaluate("clf")
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """Loss, accuracy, macro-F1 on this client's real (never imputed) test split."""
    task = read_task(msg)
    split = message_split(task, msg, context, node.EVALUATE_SPLIT)
    answer = evaluation_answer(task, split, to_state_dict(msg.content[ARRAYS]))
    return reply(msg, answer.to_metrics())


def message_split(
    task: TaskConfig, msg: Message, context: Context, purpose: int, server_round: int | None = None
) -> ClientSplit:
    """This node's split for this message (of ``server_round``, by default the message's)."""
    server_round = message_round(msg) if server_round is None else server_round
    return node.split_for(task, context.node_config, server_round, purpose)


def evaluation_answer(task: TaskConfig, split: ClientSplit, weights: dict) -> EvaluationAnswer:
    """What a client reports about a classifier: its metrics on the real test split."""
    metrics = node.evaluate_on_test(task, split, weights)
    return EvaluationAnswer(split.partition_id, len(split.test), metrics)


def train_on_node(
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
