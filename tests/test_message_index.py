"""The indexed message delivery hands out what Flower's own walk over the store does."""

from __future__ import annotations

import time

import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from bench.message_delivery import RUN_ID, SimulationLinkState
from fedaug_flwr import message_index


class Link(SimulationLinkState):
    """A simulation's link state whose message methods are Flower's or the indexed ones."""

    def stored(self) -> list[int]:
        return sorted(m.content["c"]["marker"] for m in self.state.message_ins_store.values())


def both(num_nodes: int = 5) -> tuple[Link, Link]:
    return Link(num_nodes, indexed=False), Link(num_nodes, indexed=True)


def test_every_poll_hands_out_the_same_messages_in_the_same_order():
    flower, indexed = both()
    # several messages per node, interleaved, as rounds of a strategy store them
    stored = [(0, 1), (1, 2), (0, 3), (2, 4), (0, 5), (3, 6), (1, 7), (0, 8)]
    polls = [(0, 1), (4, 1), (0, 1), (1, None), (0, 2), (2, 1), (2, 1), (3, 1), (0, 1)]
    for link in (flower, indexed):
        for node, marker in stored:
            link.push(node, marker)
    handed = [[link.poll(node, limit) for node, limit in polls] for link in (flower, indexed)]
    assert handed[0] == handed[1]
    assert handed[1] == [[1], [], [3], [2, 7], [5, 8], [4], [], [6], []]
    # messages stored later come after the ones already waiting, for every node
    for link in (flower, indexed):
        link.push(1, 9)
        link.push(4, 10)
        link.push(1, 11)
    later = [[link.poll(n, None) for n in (1, 4, 0)] for link in (flower, indexed)]
    assert later[0] == later[1] == [[9, 11], [10], []]
    # delivered messages stay stored (until their replies are pulled) and are not handed out again
    assert flower.stored() == indexed.stored() == list(range(1, 12))
    assert flower.poll(1) == indexed.poll(1) == []


def test_an_expired_message_is_deleted_and_not_handed_out():
    flower, indexed = both()
    for link in (flower, indexed):
        link.push(2, 1, ttl=0.05)
        link.push(2, 2)
        link.push(3, 3, ttl=0.05)
    time.sleep(0.1)
    for link in (flower, indexed):
        assert link.poll(2) == [2]  # the expired one before it is skipped
        assert 1 not in link.stored()  # and deleted by Flower's own check
        assert link.poll(3) == []
        assert link.stored() == [2]


def test_messages_stored_before_the_index_existed_are_found():
    flower, indexed = both()
    indexed.use(False)  # stored by Flower's method: no index yet
    for link in (flower, indexed):
        link.push(0, 1)
        link.push(1, 2)
        link.push(0, 3)
    indexed.use(True)
    assert [flower.poll(n, None) for n in (0, 1)] == [[1, 3], [2]]
    assert [indexed.poll(n, None) for n in (0, 1)] == [[1, 3], [2]]


def test_a_poll_filtered_by_run_is_flowers_own_and_a_bad_limit_is_refused():
    flower, indexed = both()
    for link in (flower, indexed):
        link.push(0, 1)
    assert flower.poll(0, run_id=RUN_ID) == indexed.poll(0, run_id=RUN_ID) == [1]
    with pytest.raises(AssertionError, match="limit"):
        indexed.poll(0, limit=0)


def test_install_swaps_the_class_methods_and_uninstall_restores_flowers():
    try:
        assert message_index.install() and message_index.install()  # idempotent
        assert InMemoryLinkState.get_message_ins is message_index.get_message_ins
        link = Link(3, indexed=False)
        del link.state.get_message_ins, link.state.store_message_ins  # the class's methods
        link.push(1, 1)
        assert link.poll(1) == [1]
        message_index.uninstall()
        assert InMemoryLinkState.get_message_ins is message_index._flower_get_message_ins
        assert InMemoryLinkState.store_message_ins is message_index._flower_store_message_ins
    finally:
        message_index.uninstall()


def test_another_flower_version_keeps_flowers_delivery(monkeypatch):
    monkeypatch.setattr(message_index.flwr, "__version__", "1.43.0")
    message_index.uninstall()
    assert not message_index.install()
    assert InMemoryLinkState.get_message_ins is message_index._flower_get_message_ins
