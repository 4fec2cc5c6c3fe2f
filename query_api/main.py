"""`spendstream query-api`: serve the query API and dashboard with uvicorn."""

from __future__ import annotations

import uvicorn

from query_api.app import create_app
from spendstream.settings import Settings


def run(settings: Settings) -> None:
    uvicorn.run(
        create_app(settings),
        host=settings.query_api.host,
        port=settings.query_api.port,
        log_level=settings.log_level.lower(),
        # streamed exports can be long; the default keep-alive is fine, proxies decide the rest
        access_log=False,
    )
