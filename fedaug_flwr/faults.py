"""TEST-ONLY fault injection: make chosen clients fail on purpose.

This is not a feature for users and is deliberately not a run-config key: it
exists so that the tests can prove a run survives a client that fails
mid-round. It is off unless the environment variable ``FEDAUG_TEST_FAULTS``
is set (by a test) in the process that runs the ClientApp, e.g.::

    FEDAUG_TEST_FAULTS="train.cvae@0,evaluate.clf@2:0=kill"

Each comma-separated entry is ``<message-type>@<partition-id>[:<round>][=<action>]``:

- message type: ``train.cvae``, ``query.impute``, ``train.clf`` or ``evaluate.clf``;
- partition id: the node's ``partition-id``;
- round: the message's ``server-round`` (0 for the imputation and the final
  evaluation, which are not strategy rounds); any round when left out;
- action: ``raise`` (default) raises :class:`InjectedFault` in the handler;
  ``kill`` SIGKILLs the process group of the ``flower-supernode`` that runs
  this ClientApp, as if its machine died (deployment only); ``poison`` lets
  the handler answer, then scales its update (the weights it sends minus
  those it received) by :data:`POISON_SCALE`: a well-formed reply from a
  malicious client, which only a robust aggregation (``clf-aggregation``) resists.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedaug_flwr.processes import command_line, parent_pid
from fedaug_flwr.protocol import ARRAYS, message_round
from fedaug_flwr.transport import from_array, to_array

ENV_VAR = "FEDAUG_TEST_FAULTS"
ACTIONS = ("raise", "kill", "poison")
POISON_SCALE = 1e3
_ENTRY = re.compile(
    r"^(?P<type>[a-z]+\.[a-z]+)@(?P<partition>\d+)(?::(?P<round>\d+))?(?:=(?P<action>\w+))?$"
)


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


@dataclass(frozen=True)
class Fault:
    message_type: str
    partition_id: int
    server_round: int | None
    action: str

    def matches(self, message_type: str, partition_id: int, server_round: int) -> bool:
        return (
            self.message_type == message_type
            and self.partition_id == partition_id
            and self.server_round in (None, server_round)
        )


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        match = _ENTRY.match(entry)
        action = (match and match.group("action")) or "raise"
        if match is None or action not in ACTIONS:
            raise ValueError(
                f"{ENV_VAR} entry {entry!r} must look like "
                f"'<message-type>@<partition-id>[:<round>][=raise|kill|poison]'"
            )
        server_round = match.group("round")
        faults.append(
            Fault(
                match.group("type"),
                int(match.group("partition")),
                None if server_round is None else int(server_round),
                action,
            )
        )
    return faults


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod that fails the messages named in ``FEDAUG_TEST_FAULTS``; else a no-op."""
    text = os.environ.get(ENV_VAR, "")
    if text:
        partition_id = context.node_config.get("partition-id", -1)
        server_round = message_round(msg)
        message_type = msg.metadata.message_type
        for fault in parse_faults(text):
            if fault.matches(message_type, partition_id, server_round):
                if fault.action == "poison":
                    return poisoned(msg, call_next(msg, context))
                if fault.action == "kill":
                    kill_own_supernode()
                raise InjectedFault(
                    f"injected test fault: {message_type} on partition {partition_id}, "
                    f"round {server_round}"
                )
    return call_next(msg, context)


def poisoned(msg: Message, reply: Message) -> Message:
    """``reply`` with its update scaled by :data:`POISON_SCALE` (floating arrays only)."""
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    received, sent = msg.content[ARRAYS], reply.content[ARRAYS]
    scaled = ArrayRecord()
    for name, array in sent.items():
        values = from_array(array)
        if values.dtype.kind == "f":
            start = from_array(received[name])
            values = (start + POISON_SCALE * (values - start)).astype(values.dtype)
        scaled[name] = to_array(values)
    reply.content[ARRAYS] = scaled
    return reply


def supernode_ancestor(pid: int | None = None) -> int | None:
    """The pid of the ``flower-supernode`` process this process descends from, if any."""
    pid = os.getpid() if pid is None else pid
    while pid is not None and pid > 1:
        cmdline = command_line(pid)
        if cmdline is None:
            return None
        if any(part.endswith(b"flower-supernode") for part in cmdline[:2]):
            return pid
        pid = parent_pid(pid)
    return None


def kill_own_supernode() -> None:
    supernode = supernode_ancestor()
    if supernode is None:
        raise InjectedFault("a 'kill' fault needs a flower-supernode parent (deployment only)")
    group = os.getpgid(supernode)
    # Our deployment starts every SuperNode as a process-group leader: take the whole group
    # (its SuperExec and this ClientApp too), as if the machine died.
    if group == supernode:
        os.killpg(group, signal.SIGKILL)
    else:
        os.kill(supernode, signal.SIGKILL)
