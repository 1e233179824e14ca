"""Handing out a simulation's messages in time per node, not per node x stored message.

Flower 1.42's simulation engine has a thread (``vce_api.add_messages_to_queue``) that
asks the in-memory link state for each node's next message, for every node, every
0.1 s. ``InMemoryLinkState.get_message_ins`` answers by walking the whole message store
and checking every message it passes (expiry, federation) until it finds one for that
node. A round's messages stay in the store until the ServerApp pulls their replies, so
with N clients every poll cycle checks about N x N messages for the whole round: at 100
clients that thread took about a quarter of a core from the client actors throughout a
paper-scale round (profiled with py-spy), and at 1,000 clients one cycle takes seconds.
Flower has no setting for it, and the thread starts before the app runs, so the app
cannot swap the loop; it can make each call cheap.

:func:`install` (``sim-message-index = true``, the default) gives the in-memory link
state an index of undelivered message ids per destination node, filled where Flower
stores a message (``store_message_ins``), and answers ``get_message_ins`` from the
node's own list, in the order the messages were stored, checking each one with Flower's
own ``_check_stored_messages`` as Flower's walk does. It returns what Flower's walk
returns; the one difference is when an expired message of another node is deleted (at
that node's poll, in the same cycle, instead of at the first poll that passes it).
Calls that filter by ``run_id`` go to Flower's own method. Installed only under the
Flower version it was written against; the indexed methods live on the class, so they
serve every in-memory link state of the process (in a simulation the ServerApp shares
its process with the engine; elsewhere nothing calls them).
"""

from __future__ import annotations

from collections import defaultdict, deque

import flwr
from flwr.app import Message
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

from fedaug_flwr import log

FLOWER_VERSION = "1.42."  # the link state's internals this was written against
_INDEX = "_fedaug_undelivered"  # the index's attribute on a link state
_installs = 0  # an index from before the last install may have missed messages: rebuilt

_flower_get_message_ins = InMemoryLinkState.get_message_ins
_flower_store_message_ins = InMemoryLinkState.store_message_ins


def _undelivered(state: InMemoryLinkState) -> dict[int, deque[str]]:
    """The state's index: per destination node, the ids of messages not yet handed out,
    in the order they were stored. Built from the store the first time, so messages
    stored before the index existed are in it too."""
    built_at, index = state.__dict__.get(_INDEX, (None, None))
    if index is None or built_at != _installs:
        index = defaultdict(deque)
        for message_id, message in state.message_ins_store.items():
            if message.metadata.delivered_at == "":
                index[message.metadata.dst_node_id].append(message_id)
        state.__dict__[_INDEX] = (_installs, index)
    return index


def store_message_ins(self: InMemoryLinkState, message: Message) -> str | None:
    """Flower's ``store_message_ins``, and the stored message into the index."""
    with self.lock:
        index = _undelivered(self)  # before storing: a first build must not see it twice
        is_new = message.metadata.message_id not in self.message_ins_store
        message_id = _flower_store_message_ins(self, message)
        if message_id is not None and is_new:
            index[message.metadata.dst_node_id].append(message_id)
    return message_id


def get_message_ins(
    self: InMemoryLinkState, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Message]:
    """Flower's ``get_message_ins`` from the node's own undelivered messages."""
    if run_id is not None:
        return _flower_get_message_ins(self, node_id, limit, run_id=run_id)
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    found_ids: set[str] = set()
    with self.lock:
        pending = _undelivered(self).get(node_id)
        while pending and not (limit and len(found) == limit):
            message_id = pending.popleft()  # handed out now, or gone, or handed out before
            self._check_stored_messages({message_id})  # Flower's checks: expired -> deleted
            message = self.message_ins_store.get(message_id)
            if (
                message is not None
                and message.metadata.dst_node_id == node_id
                and message.metadata.delivered_at == ""
                and message_id not in found_ids
            ):
                found.append(message)
                found_ids.add(message_id)
    delivered_at = now().isoformat()  # as Flower marks them: after the lock
    for message in found:
        message.metadata.delivered_at = delivered_at
    return found


def install() -> bool:
    """Index the in-memory link state's undelivered messages (idempotent); False, with a
    warning, under another Flower version than the one this was written against."""
    if InMemoryLinkState.get_message_ins is get_message_ins:
        return True
    if not flwr.__version__.startswith(FLOWER_VERSION):
        log.warning(
            "[fedaug] sim-message-index: written for Flower %sx, this is %s; Flower's own "
            "message delivery is used",
            FLOWER_VERSION,
            flwr.__version__,
        )
        return False
    global _installs
    _installs += 1
    InMemoryLinkState.get_message_ins = get_message_ins
    InMemoryLinkState.store_message_ins = store_message_ins
    log.info("[fedaug] sim-message-index: each node's messages are handed out from an index")
    return True


def uninstall() -> None:
    """Flower's own methods again (tests and benchmarks compare both)."""
    InMemoryLinkState.get_message_ins = _flower_get_message_ins
    InMemoryLinkState.store_message_ins = _flower_store_message_ins
