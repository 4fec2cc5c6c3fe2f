"""Where the CPU goes: per-process CPU and memory (psutil), and sampled Python stacks (py-spy)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: innermost frames of a thread that waits (py-spy's idle detection misses blocking C calls)
IDLE_LEAVES = (
    "EpollSelector.select",
    "_worker",
    "Condition.wait",
    "Event.wait",
    "SocketIO.readinto",
    "Thread.join",
    "select",
    "poll",
    "sleep",
)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far (a shared box does not inflate it)."""
    total = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def start_py_spy(pid: int, seconds: float, out: Path, rate: int = 50) -> subprocess.Popen | None:
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        [binary, "record", "-r", str(rate), "-d", str(int(seconds)), "--format", "raw", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


@dataclass
class HotSpots:
    #: samples of threads doing work (waiting frames left out, see IDLE_LEAVES)
    busy: int
    samples: int
    #: (frame, share of busy samples in which it is the innermost Python frame)
    self_time: list[tuple[str, float]]
    #: (frame, share of busy samples in which it is on the stack), project code only
    inclusive: list[tuple[str, float]]


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m['func']} ({file})"


def hot_spots(
    raw: Path,
    top: int = 8,
    own_code: tuple[str, ...] = ("spendstream/", "ingest_gateway/", "stream_processors/", "query_api/"),
) -> HotSpots:
    """Summarise py-spy's raw (collapsed) output: innermost frames and our own functions by share
    of the samples in which a thread was busy."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1].split(" (", 1)[0] in IDLE_LEAVES:
            continue
        busy += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            if any(marker in frame for marker in own_code):
                inclusive[frame] += n
    if not busy:
        return HotSpots(0, samples, [], [])
    return HotSpots(
        busy,
        samples,
        [(f, n / busy) for f, n in leaf.most_common(top)],
        [(f, n / busy) for f, n in inclusive.most_common(top)],
    )
