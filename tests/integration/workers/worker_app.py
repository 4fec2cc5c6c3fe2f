"""What the test workers' Faust apps share: broker settings from SPENDSTREAM_* variables (through
``spendstream.kafka.faust_settings``, so the profile under test is the stages'), a data directory
and the web port the test polls. Imported by the worker scripts, which run with this folder first
on ``sys.path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spendstream.kafka import faust_settings
from spendstream.settings import Settings


def app_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for a test worker's ``faust.App`` (or subclass) besides its id."""
    return {
        **faust_settings(settings),
        "datadir": str(Path(settings.data_dir) / "faust"),
        "web_host": "127.0.0.1",
        "web_port": settings.processors.web_port,
        "autodiscover": False,
    }
