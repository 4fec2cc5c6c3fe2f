"""Source positions of a stage that keeps its own (the budgets stage, see agents.py): which
messages of a batch to process, which were processed before (redelivered), and which the consumer
skipped. Pure; not budget-specific (runtime for any stage that stores its positions with its state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class PositionSplit:
    """One batch of a source topic checked against the positions kept with the state."""

    #: indexes of the items to process, in order
    take: list[int] = field(default_factory=list)
    #: indexes of items already processed before (redelivered): ack, do not process
    stale: list[int] = field(default_factory=list)
    #: (partition, first missing offset, the offset that came instead): the consumer skipped
    #: these messages; they must be read and processed before that offset
    gaps: list[tuple[int, int, int]] = field(default_factory=list)
    #: partition -> next offset once the batch (and its gaps) is processed
    advanced: dict[int, int] = field(default_factory=dict)


def split_by_position(items: Iterable[tuple[int, int]], positions: Mapping[int, int]) -> PositionSplit:
    """Check (partition, offset) items (in delivery order) against the next offset to process per
    partition. Offsets of these topics are contiguous (no compaction, no transactions), so an
    offset below the expected one is a redelivery and one above it means messages were skipped
    before reaching the stage. A partition without a position (never processed) starts wherever
    its first item is."""
    out = PositionSplit()
    expected = dict(positions)
    for index, (partition, offset) in enumerate(items):
        want = expected.get(partition)
        if want is not None and offset < want:
            out.stale.append(index)
            continue
        if want is not None and offset > want:
            out.gaps.append((partition, want, offset))
        out.take.append(index)
        expected[partition] = out.advanced[partition] = offset + 1
    return out
