"""``spendstream gateway``: serve the app with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging

import uvicorn

from ingest_gateway.app import create_app
from spendstream.settings import Settings


def run(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.gateway.host,
        port=settings.gateway.port,
        loop="uvloop",
        http="httptools",
        # per-request access logs cost more than validating a request; metrics cover traffic
        access_log=False,
        log_level=settings.log_level.lower(),
    )
