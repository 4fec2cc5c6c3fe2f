"""The runtime consumer's rules record by record (stream_processors/runtime/consumer.py), without a
broker: a stream record is handed out only if it is the next offset of its partition, a redelivered
one is dropped, a jump seeks back to the first missing offset (a gap is accepted only when it
comes back ``REAL_GAP_CONFIRMATIONS`` times in a row), and the commit is the end of the run of
processed offsets that starts where the partition was committed. The broker-driven cases are in
tests/integration/test_faust_recovery.py."""

from __future__ import annotations

from faust.types import TP

from stream_processors.runtime.consumer import REAL_GAP_CONFIRMATIONS, ContiguousConsumer, StageApp

TOPIC = "unit.source"


def consumer_sought_to(tmp_path, positions: dict[int, int]) -> ContiguousConsumer:
    """The consumer of a stage app (no broker is contacted), its partitions sought as ``perform_seek``
    leaves them."""
    app = StageApp("unit-contiguous", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False,
                   datadir=str(tmp_path))  # fmt: skip
    consumer = app.consumer
    assert isinstance(consumer, ContiguousConsumer)
    for partition, offset in positions.items():
        consumer._next_offset[TP(TOPIC, partition)] = offset
        consumer._commit_from[TP(TOPIC, partition)] = offset
    return consumer


async def test_hands_out_the_next_offset_only_drops_redeliveries_and_seeks_back_at_a_jump(tmp_path):
    consumer = consumer_sought_to(tmp_path, {0: 5, 1: 7})
    # partition 1 jumps from 7 to 10; after the seek back, 8.. come again
    items = [(0, 5), (1, 7), (0, 6), (0, 4), (1, 10), (1, 8), (1, 9), (1, 10), (1, 11), (0, 7), (1, 14)]
    handed_out, dropped, sought = [], [], []
    for partition, offset in items:
        seek_to = consumer._out_of_sequence(TP(TOPIC, partition), offset)
        if seek_to is None:
            handed_out.append((partition, offset))
        elif seek_to < 0:
            dropped.append((partition, offset))
        else:
            sought.append((partition, offset, seek_to))
    assert handed_out == [(0, 5), (1, 7), (0, 6), (1, 8), (1, 9), (1, 10), (1, 11), (0, 7)]
    assert dropped == [(0, 4)]
    # expected 8 after 7 but got 10, then 12 but got 14: both times back to the first missing offset
    assert sought == [(1, 10, 8), (1, 14, 12)]
    assert consumer._next_offset == {TP(TOPIC, 0): 8, TP(TOPIC, 1): 12}
    assert not consumer._gap[TP(TOPIC, 1)], "a jump seen once is not a gap"


async def test_a_jump_is_a_gap_only_when_it_comes_back_after_each_seek(tmp_path):
    tp = TP(TOPIC, 0)
    consumer = consumer_sought_to(tmp_path, {0: 8})
    assert [consumer._out_of_sequence(tp, 10) for _ in range(REAL_GAP_CONFIRMATIONS - 1)] == [8] * (
        REAL_GAP_CONFIRMATIONS - 1
    )
    assert consumer._out_of_sequence(tp, 10) is None
    assert [(i.begin, i.end) for i in consumer._gap[tp]] == [(8, 10)], "exactly the missing offsets"
    assert consumer._next_offset[tp] == 11


async def test_commits_only_the_run_of_processed_offsets_from_the_committed_one(tmp_path):
    tp = TP(TOPIC, 0)
    consumer = consumer_sought_to(tmp_path, {0: 5})
    consumer._acked[tp] += [6, 7]
    assert consumer._new_offset(tp) is None, "5 is not processed: nothing may be committed"
    consumer._acked[tp].append(5)
    assert consumer._new_offset(tp) == 8
    consumer._acked[tp].append(10)
    consumer._gap[tp].addi(8, 10)  # a confirmed gap counts as done, a hole after it does not
    consumer._acked[tp].append(12)
    assert consumer._new_offset(tp) == 11
    assert consumer._new_offset(tp) is None
