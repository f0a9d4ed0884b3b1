"""The directed core's journal replayed into dicts: ``ReplayStore`` is the smallest store that
honours the journal contract; every test that replays a journal into it also proves the
journal says everything the core changed. Shared by test_core.py and test_state.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from workers.directed.core import DirectedCore
from workers.directed.model import (
    Buffer,
    ClearBuffer,
    Counts,
    DeleteContent,
    Dequeue,
    Detail,
    Enqueue,
    NewMessage,
    Op,
    Purge,
    SetBuffer,
    SetGap,
)


class ReplayStore:
    """Dicts that apply the journal op by op and refuse anything the contract rules out."""

    def __init__(self) -> None:
        self.details: dict[int, Detail] = {}
        self.content: set[int] = set()
        self.queues: dict[str, dict[int, int]] = {}  # target -> {seq: mid}
        self.buffers: dict[str, Buffer] = {}
        self.gaps: dict[str, tuple[int, tuple[str, ...]]] = {}

    def apply(self, ops: list[Op]) -> None:
        for op in ops:
            match op:
                case NewMessage():
                    assert op.mid not in self.details
                    self.details[op.mid] = Detail(
                        op.mid,
                        op.message_id,
                        op.total,
                        op.total,
                        created_ms=op.created_ms,
                        expires_at_ms=op.expires_at_ms,
                    )
                    self.content.add(op.mid)
                case Enqueue():
                    q = self.queues.setdefault(op.target, {})
                    assert op.seq == (max(q) + 1 if q else 1), "seqs are contiguous from 1"
                    q[op.seq] = op.mid
                case Dequeue():
                    q = self.queues[op.target]
                    gone = [seq for seq in q if seq <= op.upto_seq]
                    assert gone, "a dequeue always removes something"
                    for seq in gone:
                        del q[seq]
                    if not q:
                        del self.queues[op.target]
                case SetBuffer():
                    old = self.buffers.get(op.target)
                    assert old is None or not old.missed, "a batch with a gap is cleared first"
                    assert op.mids or op.missed, "a batch has messages or a gap"
                    assert len(op.missed_ids) == min(op.missed, 100)
                    self.buffers[op.target] = Buffer(
                        op.record_id, op.mids, op.missed, op.missed_ids
                    )
                case SetGap():
                    assert len(op.missed_ids) == min(op.missed, 100)
                    if op.missed:
                        assert op.missed > self.gaps.get(op.target, (0, ()))[0], "gaps only grow"
                        self.gaps[op.target] = (op.missed, op.missed_ids)
                    else:
                        del self.gaps[op.target]
                case ClearBuffer():
                    del self.buffers[op.target]
                case Counts():
                    d = self.details[op.mid]
                    assert d.alive, "counters of a tombstone never change"
                    d.remaining, d.acked = op.remaining, op.acked
                    d.expired, d.dropped = op.expired, op.dropped
                    assert op.recalled >= d.recalled
                    d.recalled = op.recalled
                case DeleteContent():
                    assert op.mid in self.content, "content is deleted exactly once"
                    self.content.remove(op.mid)
                    d = self.details[op.mid]
                    assert d.remaining == 0
                    d.done_ms = op.done_ms
                case Purge():
                    assert not self.details.pop(op.mid).alive
                case _:  # pragma: no cover
                    raise AssertionError(f"unknown op {op!r}")

    def restore(self, **config: Any) -> DirectedCore:
        return DirectedCore.restore(
            details=[dataclasses.replace(d) for d in self.details.values()],
            queues={t: sorted(q.items()) for t, q in self.queues.items()},
            buffers=dict(self.buffers),
            gaps=dict(self.gaps),
            **config,
        )

    def alive_queue(self, target: str) -> list[int]:
        q = self.queues.get(target, {})
        return [q[seq] for seq in sorted(q) if q[seq] in self.content]


def replayed(core: DirectedCore, store: ReplayStore | None = None) -> ReplayStore:
    store = store or ReplayStore()
    store.apply(core.take_journal())
    return store


def fill(core: DirectedCore, *requests: tuple[str, list[str]], now: int = 0) -> list[int]:
    mids = []
    for message_id, targets in requests:
        result = core.submit(message_id, targets, now, None)
        assert result.status == "accepted" and result.mid is not None
        mids.append(result.mid)
    return mids
