"""What the stream-stage benchmarks share: an embedded broker and ClickHouse of their own, stage
workers as child processes (the same ``spendstream processors --stages X`` that production runs),
and writing a section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from stage_support import migrate  # noqa: E402

from spendstream.embedded.clickhouse import EmbeddedClickHouse  # noqa: E402
from spendstream.embedded.kafka import EmbeddedKafka  # noqa: E402
from spendstream.ports import free_port  # noqa: E402
from spendstream.settings import Settings  # noqa: E402
from spendstream.topics import ensure_topics_sync  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


@dataclass
class BenchStack:
    settings: Settings
    work: Path
    broker: EmbeddedKafka
    clickhouse: EmbeddedClickHouse


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def embedded_stack(partitions: int = 4, **processors: float) -> Iterator[BenchStack]:
    """A fresh broker, ClickHouse and migrated database."""
    with tempfile.TemporaryDirectory(prefix="spendstream-bench-") as tmp:
        work = Path(tmp)
        broker = EmbeddedKafka(log_path=work / "tansu.log").start()
        clickhouse = EmbeddedClickHouse(path=str(work / "chdb")).start()
        try:
            settings = Settings(
                data_dir=str(work / "data"),
                kafka={"bootstrap_servers": broker.bootstrap, "profile": "embedded", "partitions": partitions},
                clickhouse={"url": clickhouse.url, "database": "bench"},
                gateway={"port": free_port()},
                processors={"web_port": free_port(), **processors},
            )
            migrate(settings)
            ensure_topics_sync(settings)
            yield BenchStack(settings, work, broker, clickhouse)
        finally:
            clickhouse.stop()
            broker.stop()


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, {os.cpu_count()} cores "
        f"shared with other work (load average {load:.1f} at the end)"
    )


def replace_section(title: str, report: str) -> None:
    """Replace the ``## title`` section of bench/RESULTS.md (or append it), keeping the others."""
    heading = f"## {title}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        following = rest.find("\n## ")
        tail = rest[following + 1 :] if following >= 0 else ""
        text = head + report + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + report
    RESULTS.write_text(text)
