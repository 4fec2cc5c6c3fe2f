"""The stage consumer: the delivery guarantee every stage's correctness depends on.

The guarantee: for each partition of a stage's source topics, the agent receives the records in
offset order, starting at the group's committed offset (the earliest offset when none is
committed), none left out; and an offset is committed only once every record below it was
processed (acked by its agent). A restart or rebalance therefore replays from the committed offset,
in order, and each stage drops its replays (pricing by its dedupe index, budgets and the sink by
their source-offset watermarks), which is right only because nothing arrives late or not at all.

This consumer is the one mechanism for it; nothing else re-reads or re-orders input. (The
budgets stage used to keep its own source positions and read skipped records back directly; the
SIGKILL test of tests/integration/test_budgets_stage.py passes without that, the restarted
worker's records held back at its seek being fetched again here, see 6.) The pricing stage's
``spendstream_pricing_skipped_offsets_total`` is observability only: a tripwire that counts, and
logs at ERROR, a hole in the offsets its agent received; it repairs nothing.

faust-streaming 0.15 (``faust/transport/consumer.py``) loses stream records after restarts and
rebalances; measured as 3,630 of 1,006,666 acknowledged events missing after 20 SIGKILLs. The
ways a record gets skipped, and what this module does about each:

1. ``Consumer.getmany`` drops records it already fetched (aiokafka's position is past them) when
   the generation changes mid-batch or the partition is paused at that moment (seen: a fetch
   sent during table recovery returns stream records once recovery resumes the stream
   partitions). ``_drain_messages`` then sees the next offset jump and ``_add_gap`` records the
   missing offsets, *and the record after them*, as acknowledged. Here every record of an acking
   (stream) topic must carry the next offset expected for its partition; on a jump the consumer
   seeks back to the first missing offset and drops the rest of the fetched batch for that
   partition, and after each batch it seeks back any partition whose fetched records were not
   all handed out, so the skipped records are fetched again. A jump is accepted as a real gap (compaction, transaction markers: our input
   topics have neither) only when the same gap comes back right after seeking
   ``REAL_GAP_CONFIRMATIONS`` times in a row.
2. ``Stream`` acks the messages it skips while flow control is suspended or whose generation is
   old (records fetched before a rebalance), so those count as done without being processed.
   Here an ack counts only for a message some stream accepted (``message.tracked``).
3. aiokafka's ``seek_to_committed`` does not move a partition with no committed offset (or 0),
   so after a rebalance such a partition resumes wherever the fetcher was, past the records
   dropped from queues. Here such partitions are sought to their earliest offset, the position a
   new group starts from (``auto_offset_reset='earliest'``).
4. ``_new_offset`` commits the first run of acked offsets without checking that it starts at the
   committed offset (off by one, and not at all when nothing was committed yet), and a gap merged
   over a real ack duplicates the offset. Here the commit is the end of the run of acked (or
   real-gap) offsets that starts exactly where the partition was last committed or sought to.

5. ``_drain_messages`` skips records below its read offset, which it sets after each delivery;
   when ``perform_seek`` runs while a delivery is in flight, the stale offset overwrites the
   sought one and the records fetched again after the seek are skipped silently (seen: a
   restarted pricing worker that never committed again). Here the sequence check above is the
   only filter for stream records.

6. Faust's recovery seeks the stream partitions to their committed offsets with flow already on
   (after reading a table's changelog) and only then calls ``app.flow_control.resume()``, which
   *clears every stream queue*: records the fetch loop handed out in between vanish, neither
   processed nor acked, and the agent goes on with the next one. (A restarted pricing worker's
   output went from raw offset 141 to 143: 142 was the first record after the seek.) Here no
   stream record is handed out for a partition until ``perform_seek`` has set where its records
   start in this assignment, and after a seek not before Faust resumes the consumer's flow, which
   it does right after that clearing resume. The fetch loop keeps fetching meanwhile, so the
   position of a partition whose records were held back is sought back to where handing out
   starts once flow resumes: nothing may come later to show they were not handed out (seen: a
   restarted budgets worker fetched its whole backlog while held, then idled).
7. Should a record handed out still be dropped unprocessed (a stream skips it, or flow control
   clears it from a queue), the consumer seeks back to it before handing out anything more of
   that partition, with an ERROR: processed out of order, but processed. That breaks the order
   half of the guarantee for this record (a watermark would take it for a replay): no known path
   leads here since 6., and the ERROR is the alarm.

The consumer is installed by ``StageApp`` (used by ``stream_processors.runtime.app.create_app``)
for every stage. It depends on Faust internals (``_acked``, ``_gap``, ``_read_offset``); the
regression tests in tests/integration/test_faust_recovery.py pin the behaviour, and
tests/unit/test_contiguous_consumer.py the sequence and commit rules record by record.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import faust
from faust.transport.consumer import ack_lock
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from mode.utils.futures import notify
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

log = logging.getLogger(__name__)

#: a jump seen this many times in a row right after seeking back is in the log itself
REAL_GAP_CONFIRMATIONS = 3


class ContiguousConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, delivering and committing stream records without holes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: next offset to deliver, per stream partition (known once the partition was sought)
        self._next_offset: dict[TP, int] = {}
        #: where the committed run of processed offsets ends, per stream partition
        self._commit_from: dict[TP, int] = {}
        #: the last jump sought back from: (expected offset, offset seen, times in a row)
        self._rewinds: dict[TP, tuple[int, int, int]] = {}
        #: per stream partition in the batch being handed out, the offset after its last record
        self._fetched_to: dict[TP, int] = {}
        #: per stream partition, the lowest offset handed out but dropped unprocessed (see 7.)
        self._skipped: dict[TP, int] = {}
        #: closed by a seek until Faust resumes flow (see 6.)
        self._held_since_seek = False
        #: stream partitions whose fetched records were held back (see 6.): once flow resumes,
        #: they are fetched again from where handing out starts
        self._refetch: set[TP] = set()

    async def perform_seek(self) -> None:
        self._held_since_seek = True
        committed = await self.seek_to_committed()
        positions = {tp: offset for tp, offset in committed.items() if offset and offset > 0}
        unset = [tp for tp in committed if tp not in positions]
        if unset:
            earliest = await self.earliest_offsets(*unset)
            for tp in unset:
                positions[tp] = earliest.get(tp) or 0
                await self.seek(tp, positions[tp])
        self._read_offset.update({tp: offset or None for tp, offset in positions.items()})
        self._committed_offset.update({tp: offset or None for tp, offset in committed.items() if offset is not None})
        for tp, offset in positions.items():
            self._next_offset[tp] = offset
            self._commit_from[tp] = offset
            self._rewinds.pop(tp, None)
        log.info(
            "stream partitions sought to %s; held until flow resumes",
            {
                f"{tp.topic}/{tp.partition}": offset
                for tp, offset in sorted(positions.items())
                if self.app.topics.acks_enabled_for(tp.topic)
            },
        )

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Mapping[TP, list[Any]]:
        records = await super()._getmany(active_partitions, timeout)
        self._fetched_to = {
            tp: batch[-1].offset + 1
            for tp, batch in records.items()
            if batch and self.app.topics.acks_enabled_for(tp.topic)
        }
        return records

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._forget(tp)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        # a partition kept over the rebalance is sought again too; until then nothing is handed out
        for tp in assigned:
            self._forget(tp)
        await super().on_partitions_assigned(assigned, generation_id)

    def resume_flow(self) -> None:
        if self._held_since_seek:
            log.info("flow resumed: handing out stream records from the sought offsets")
        self._held_since_seek = False
        super().resume_flow()

    def note_dropped(self, message: Message) -> None:
        """A record handed out is gone without being processed: fetch it again (see 7.)."""
        if message.tracked or not self.app.topics.acks_enabled_for(message.topic):
            return
        tp = message.tp
        if message.offset < self._skipped.get(tp, message.offset + 1):
            self._skipped[tp] = message.offset

    def _forget(self, tp: TP) -> None:
        self._next_offset.pop(tp, None)
        self._refetch.discard(tp)
        self._commit_from.pop(tp, None)
        self._rewinds.pop(tp, None)
        self._skipped.pop(tp, None)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        self._fetched_to = {}
        # Seeks made before the fetch need no filtering after it: aiokafka discards records
        # fetched from a position that changed since. A seek made while handing out a batch marks
        # the partition ``rewound``: the rest of the batch is from before that seek.
        if self._refetch and not self._held_since_seek:
            await self._fetch_held_again()
        if self._skipped:
            await self._seek_back_to_skipped()
        rewound: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            if self._skipped:
                rewound.update(await self._seek_back_to_skipped())
            if not self.app.topics.acks_enabled_for(message.topic):
                yield tp, message
            elif tp not in rewound and tp in self._next_offset and not self._held_since_seek:
                seek_to = self._out_of_sequence(tp, message.offset)
                if seek_to is None:
                    # this filter alone decides (see 5. above): Faust's own skips every record
                    # below its read offset, which a delivery in flight during a seek leaves stale
                    self._read_offset[tp] = None
                    yield tp, message
                elif seek_to >= 0:
                    rewound.add(tp)
                    await self.seek(tp, seek_to)
        # Records Faust fetched but did not hand out (see 1. above): fetch them again now rather
        # than when a later record shows the jump, which may never come.
        assignment = self.assignment()
        for tp, fetched_to in self._fetched_to.items():
            expected = self._next_offset.get(tp)
            if tp not in assignment:
                continue
            if expected is None or self._held_since_seek:
                # held back (see 6.): where its records start is not known yet, or not final
                # until flow resumes; the fetch position may already be past them
                self._refetch.add(tp)
            elif tp not in rewound and expected < fetched_to:
                log.warning(
                    "%s: fetched up to offset %d, handed out up to %d; seeking back to %d",
                    tp,
                    fetched_to - 1,
                    expected - 1,
                    expected,
                )
                await self.seek(tp, expected)

    async def _fetch_held_again(self) -> None:
        """Seek the partitions whose records were held back to where handing out starts: their
        fetch position moved past records nobody processed, and nothing may come to reveal that
        (seen: a restarted budgets worker that fetched its whole backlog while held, then idled)."""
        held, self._refetch = self._refetch, set()
        assignment = self.assignment()
        sought: dict[TP, int] = {}
        for tp in held:
            expected = self._next_offset.get(tp)
            if expected is None:
                if tp in assignment:
                    self._refetch.add(tp)  # not sought in this assignment yet
                continue
            sought[tp] = expected
            await self.seek(tp, expected)
        if sought:
            log.info(
                "records fetched while held are fetched again from %s",
                {f"{tp.topic}/{tp.partition}": offset for tp, offset in sorted(sought.items())},
            )

    async def _seek_back_to_skipped(self) -> set[TP]:
        skipped, self._skipped = self._skipped, {}
        rewound: set[TP] = set()
        for tp, offset in skipped.items():
            expected, start = self._next_offset.get(tp), self._commit_from.get(tp)
            if expected is None or start is None or not start <= offset < expected:
                continue  # sought since (rebalance), or already processed and committed
            log.error(
                "%s: offset %d was handed out but dropped unprocessed; seeking back to it "
                "(offsets up to %d were handed out after it)",
                tp,
                offset,
                expected - 1,
            )
            self._next_offset[tp] = offset
            self._rewinds.pop(tp, None)
            await self.seek(tp, offset)
            rewound.add(tp)
        return rewound

    def _out_of_sequence(self, tp: TP, offset: int) -> int | None:
        """None if the record is next in line (delivered), else the offset to seek back to, or
        -1 to drop it without seeking (it was delivered since the last seek)."""
        expected = self._next_offset[tp]
        if offset == expected:
            self._next_offset[tp] = offset + 1
            self._rewinds.pop(tp, None)
            return None
        if offset < expected:
            return -1
        previous = self._rewinds.get(tp)
        times = previous[2] + 1 if previous is not None and previous[:2] == (expected, offset) else 1
        if times >= REAL_GAP_CONFIRMATIONS:
            log.warning(
                "%s: offsets %d..%d are not in the log (seen %d times); treating them as a gap",
                tp,
                expected,
                offset - 1,
                times,
            )
            self._gap[tp].addi(expected, offset)
            self._next_offset[tp] = offset + 1
            self._rewinds.pop(tp, None)
            return None
        self._rewinds[tp] = (expected, offset, times)
        log.warning("%s: fetched offset %d while %d was expected; seeking back to %d", tp, offset, expected, expected)
        return expected

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Gaps are recorded by ``_out_of_sequence``, exactly the missing offsets; Faust's caller
        would also count the record after the gap as done before it is processed."""

    def ack(self, message: Message) -> bool:
        if message.tracked or not self.app.topics.acks_enabled_for(message.topic):
            return super().ack(message)
        # A stream skipped it (flow suspended or an older generation): not processed, so not
        # done. A rebalance seeks back to the committed offset anyway; otherwise getmany seeks
        # back to it (see 7.).
        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
            self.note_dropped(message)
        notify(self._waiting_for_ack)
        return False

    def _new_offset(self, tp: TP) -> int | None:
        start = self._commit_from.get(tp)
        if start is None:
            return None
        acked = self._acked[tp]
        done = set(acked)
        for interval in self._gap[tp]:
            done.update(range(interval.begin, interval.end))
        end = start
        while end in done:
            end += 1
        if end == start:
            return None
        acked[:] = [offset for offset in acked if offset >= end]
        self._acked_index[tp].intersection_update(acked)
        self._gap[tp].chop(0, end)
        self._commit_from[tp] = end
        return end


class ContiguousTransport(aiokafka_driver.Transport):
    Consumer = ContiguousConsumer


class ReportingFlowControl(FlowControlEvent):
    """Faust's flow control, telling the consumer which records its clearing of the stream queues
    drops (``resume()`` clears them too)."""

    def __init__(self, app: faust.App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    def clear(self) -> None:
        consumer = self._app.consumer
        if isinstance(consumer, ContiguousConsumer):
            for queue in list(self._queues):
                for item in list(queue._queue):  # type: ignore[attr-defined]
                    message = getattr(item, "message", None)
                    if message is not None:
                        consumer.note_dropped(message)
        super().clear()


class StageApp(faust.App):
    """``faust.App`` whose consumer is ``ContiguousConsumer``."""

    def _new_transport(self) -> ContiguousTransport:
        return ContiguousTransport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return ReportingFlowControl(self, loop=self.loop)
