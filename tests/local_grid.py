"""A Grid that delivers each message to the real ClientApp in this process.

It runs the real ServerApp pipeline and the real ClientApp handlers with real
Messages, without Ray or a SuperLink, so fault tests take seconds. Like a
SuperLink it turns a handler's exception into an error reply, and a node
listed in ``silent`` never answers (a dead SuperNode: the round times out).

Building a ``Message`` outside a Flower run needs ``TaskIdentity`` set; that is
Flower-internal, so keep its use here and nowhere else.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 1000

# A run small enough for seconds in one process: one round per phase, 10 images imputed, no
# generator-quality check (its default 6,000 synthetic images took most of each fault test).
SMALL_RUN = {
    "cvae-rounds": 1,
    "clf-rounds": 1,
    "num-synthetic": 10,
    "min-clients": 2,
    "eval-batch-size": 500,
    "round-timeout": 30.0,
    "quality-samples": 0,
}


class LocalGrid:
    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, object]],
        silent: Iterable[int] = (),
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=1,
                node_id=FIRST_NODE_ID + i,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config={},
            )
            for i, node_config in enumerate(node_configs)
        }
        self.silent = set(silent)
        self.delivered: list[tuple[int, str]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # a SuperLink's job
            node_id = message.metadata.dst_node_id
            self.delivered.append((node_id, message.metadata.message_type))
            if node_id in self.silent:
                continue
            try:
                reply = self.client_app(message, self.contexts[node_id])
            except Exception as error:  # noqa: BLE001 - a SuperNode does the same
                reply = Message(
                    Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message
                )
            replies.append(reply)
        return replies


def set_task_identity() -> None:
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
