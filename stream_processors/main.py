"""`spendstream processors --stages ...`: run stream stages, one Faust app per stage.

One stage runs in this process. Several stages run as one child process each, which this process
only supervises (``stream_processors.runtime.supervisor``).

The stages are listed in ``stream_processors.stages``.
"""

from __future__ import annotations

import asyncio
import importlib

from spendstream.settings import Settings
from stream_processors.runtime.supervisor import supervise
from stream_processors.stages import STAGES


def run(settings: Settings, stages: list[str]) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise SystemExit(f"unknown stage(s) {unknown or stages}; choose from {', '.join(STAGES)}")
    if len(stages) == 1:
        run_stage(settings, stages[0])
    else:
        raise SystemExit(supervise(settings, list(dict.fromkeys(stages))))


def run_stage(settings: Settings, stage: str) -> None:
    """Run one stage's Faust worker in this process until SIGTERM/SIGINT."""
    import faust

    from spendstream.topics import ensure_topics
    from stream_processors.runtime.app import create_app

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Source topics must exist before the consumer subscribes (Faust only declares its own).
    loop.run_until_complete(ensure_topics(settings))
    app = create_app(settings, stage)
    importlib.import_module(f"stream_processors.{stage}.agents").register(app, settings)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level.lower())
    worker.execute_from_commandline()
