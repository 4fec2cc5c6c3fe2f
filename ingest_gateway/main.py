"""``spendstream gateway``: serve the app with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from ingest_gateway.app import create_app
from spendstream.settings import Settings


def app_from_environment() -> FastAPI:
    """The app of one worker process when ``gateway.workers`` > 1 (settings from the environment)."""
    return create_app(Settings())


def run(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = settings.gateway.workers
    uvicorn.run(
        "ingest_gateway.main:app_from_environment" if workers > 1 else create_app(settings),
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=settings.gateway.host,
        port=settings.gateway.port,
        loop="uvloop",
        http="httptools",
        # per-request access logs cost more than validating a request; metrics cover traffic
        access_log=False,
        # nothing reads the client address, so X-Forwarded-* need not be parsed on every request
        proxy_headers=False,
        log_level=settings.log_level.lower(),
    )
