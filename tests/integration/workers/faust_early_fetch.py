"""A Faust app whose fetcher stands past the committed offset when its stream partition resumes.

Run as ``faust_early_fetch.py worker``. Broker settings come from SPENDSTREAM_* variables through
``spendstream.kafka.faust_settings``; the app id and source topic (one partition) from
EARLY_FETCH_APP_ID / EARLY_FETCH_TOPIC, the committed offset the group starts from from
EARLY_FETCH_COMMITTED. The app is ``stream_processors.runtime.consumer.StageApp`` with two changes to
the first time recovery asks its consumer to seek to the committed offsets: the consumer first
moves the fetch position ``AHEAD`` records past the committed one and waits ``WAIT_S``, and after
the real seek it waits ``WAIT_S`` again, so the fetch loop fetches the records from the committed
offset on before the consumer knows where its records start (and in one fetch, for a small
backlog: nothing comes after them to show they were not handed out; seen: a restarted budgets
worker that idled with its backlog unprocessed).

With a table to recover, Faust has flow running when it resumes the stream partition, before that
seek, so a fetch loop standing anywhere
but the committed offset hands the agent records out of order (seen in a restarted pricing worker:
its output went from raw offset 141 to 143). The test checks the agent receives every record from
the committed offset on, in order.

``GET /seen/`` returns the offsets the agent received, in order, and the table's contents.
"""

from __future__ import annotations

import asyncio
import os

from worker_app import app_options  # this folder (see worker_app.py)

from spendstream.settings import Settings
from stream_processors.runtime.consumer import ContiguousConsumer, ContiguousTransport, StageApp

#: how far past the committed offset the fetcher stands, and for how long, before the real seek
AHEAD, WAIT_S = 10, 1.0


class EarlyFetchConsumer(ContiguousConsumer):
    moved = False
    waited = False

    async def perform_seek(self) -> None:
        if not self.moved:
            self.moved = True
            committed = int(os.environ["EARLY_FETCH_COMMITTED"])
            for tp in self.assignment():
                if tp.topic == os.environ["EARLY_FETCH_TOPIC"]:
                    await self._seek(tp, committed + AHEAD)
            await asyncio.sleep(WAIT_S)  # the fetch loop runs meanwhile
        await super().perform_seek()

    async def seek_to_committed(self):
        committed = await super().seek_to_committed()
        if not self.waited:
            self.waited = True
            await asyncio.sleep(WAIT_S)  # the fetch loop fetches from the committed offsets meanwhile
        return committed


class EarlyFetchTransport(ContiguousTransport):
    Consumer = EarlyFetchConsumer


class EarlyFetchApp(StageApp):
    def _new_transport(self) -> EarlyFetchTransport:
        return EarlyFetchTransport(self.conf.broker_consumer, self)


settings = Settings()
app = EarlyFetchApp(os.environ["EARLY_FETCH_APP_ID"], **app_options(settings))
topic = app.topic(os.environ["EARLY_FETCH_TOPIC"], key_serializer="raw", value_serializer="raw", partitions=1)
#: a table like the pricing stage's dedupe index; the test writes one record to its changelog
#: first, so start-up takes Faust's table-recovery path (flow resumed while reading the changelog,
#: still on when the stream partition is resumed and sought)
marks = app.Table("marks", partitions=1)
seen: list[int] = []


@app.agent(topic)
async def record_offsets(stream):
    async for event in stream.events():
        seen.append(event.message.offset)


@app.page("/seen/")
async def show_seen(web, request):
    return web.json({"seen": seen, "marks": {repr(k): v for k, v in marks.items()}})


if __name__ == "__main__":
    app.main()
