"""ClientApps for the benchmarks: the app's own handlers, or ones that skip the model work.

``real`` is the app's ClientApp. The no-op variants register the app's real
handlers for the phases being measured and, for the others, handlers that do
everything a real handler does *except the model's computation*: they parse
the task, derive the client's split (cached per actor, as the real handlers
do), read the synthetic images from ``context.state``, convert the received
arrays to a torch state dict and back, and answer with the same records
(weights, ``num-examples``, metrics). Timing a round with them measures what
Flower and the app's own bookkeeping cost, with no training or evaluation.

- ``noop-clf``: real CVAE and imputation, no-op classifier training and evaluation.
- ``noop``: no-op CVAE training as well (imputation stays real: the
  classifier phase needs its counts, and it is not what these variants time).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

import client_app as app_module
from fedaug_flwr import node
from fedaug_flwr.metrics import METRIC_NAMES
from fedaug_flwr.protocol import (
    ARRAYS,
    RECEIVED_EVALUATION,
    SYNTHETIC_STATE,
    TRAIN_LOSS,
    VAL_LOSS,
    EvaluationAnswer,
    TrainAnswer,
    message_round,
    read_task,
    reply,
    wants_received_evaluation,
)
from fedaug_flwr.transport import to_state_dict

VARIANTS = ("real", "noop-clf", "noop")
# Fixed answers of the no-op evaluation, with every metric a real one has (the server
# checks each reply's keys): it aggregates them like real ones.
NOOP_EVALUATION = dict.fromkeys(METRIC_NAMES, 0.0)


def _echo_weights(msg: Message) -> dict:
    """The received model, through the same conversion a real handler makes."""
    return to_state_dict(msg.content[ARRAYS])


def _task_and_split(msg: Message, context: Context, purpose: int = node.TRAIN_SPLIT):
    task = read_task(msg)
    return task, node.split_for(task, context.node_config, message_round(msg), purpose)


def noop_train_cvae(msg: Message, context: Context) -> Message:
    task, split = _task_and_split(msg, context)
    losses = {TRAIN_LOSS: 0.0, VAL_LOSS: 0.0}
    answer = TrainAnswer(split.partition_id, node.fedavg_weight(task, split), losses)
    return reply(msg, answer.to_metrics(), _echo_weights(msg))


def noop_train_classifier(msg: Message, context: Context) -> Message:
    task, split = _task_and_split(msg, context)
    synthetic = 0
    if task.app.synthetic_per_client > 0 and SYNTHETIC_STATE in context.state:
        synthetic = len(context.state[SYNTHETIC_STATE]["labels"].numpy())
    weight = node.fedavg_weight(task, split, synthetic)
    # the real handler's keys only: the server refuses a reply with others
    metrics = TrainAnswer(split.partition_id, weight, {TRAIN_LOSS: 0.0}).to_metrics()
    message = reply(msg, metrics, _echo_weights(msg))
    if wants_received_evaluation(msg):  # as the real handler, minus the evaluation
        message.content[RECEIVED_EVALUATION] = MetricRecord(_noop_evaluation(split))
    return message


def noop_evaluate_classifier(msg: Message, context: Context) -> Message:
    task, split = _task_and_split(msg, context, node.EVALUATE_SPLIT)
    _echo_weights(msg)
    return reply(msg, _noop_evaluation(split))


def _noop_evaluation(split) -> dict:
    return EvaluationAnswer(split.partition_id, len(split.test), NOOP_EVALUATION).to_metrics()


def build_client_app(variant: str) -> ClientApp:
    """The ClientApp of a benchmark variant (see the module docstring)."""
    if variant == "real":
        return app_module.app
    if variant not in VARIANTS:
        raise ValueError(f"unknown client-app variant {variant!r}; known: {list(VARIANTS)}")
    app = ClientApp()
    app.train("cvae")(noop_train_cvae if variant == "noop" else app_module.train_cvae)
    app.query("impute")(app_module.impute)
    app.train("clf")(noop_train_classifier)
    app.evaluate("clf")(noop_evaluate_classifier)
    return app
