"""Dedupe index memory and speed: the pricing stage's ``DedupeIndex`` filled with 10M ids.

    .venv/bin/python -m bench.bench_dedupe [--ids 10000000] [--rate 1000] [--write-results]

The index is fed as ``PricingStage.process`` feeds it, minus the pricing: batches of
``--batch-seconds`` of traffic at ``--rate`` events/s (simulated time), records of one of
``--scopes`` tenant/project scopes holding 1..2x``--per-record`` uuid-like event ids, each scope's
records in one of ``--partitions`` raw partitions; per record ``first_seen`` for every id, then
``remember`` for the new ones; per batch ``expire`` and ``seal`` per partition. The window
(48 h) outlasts the fill, so every id stays. Ids come from a seeded generator and are not kept,
so the process holds only what the index holds.

Memory: the resident set (VmRSS) after the fill minus before it, per id, and the index's own
account of its arrays (``DedupeIndex.nbytes``). The chunks the fill writes go to a scratch file
(latest value per key, as the compacted changelog ends up); afterwards they are loaded into a
dict as the Faust table's memory store holds them (measured the same way), and a second index is
rebuilt from them (time, RSS, same answers). Then a sliding window: ``--steady-window-ids`` ids
per window, filled for two windows, so half the chunks expired and their slots were swept.
Each part runs in a forked child of its own, so no part reuses memory another one freed.
Throughput: lookups of new ids (misses), remember + seal (inserts), lookups of remembered ids
(hits: a client retry or a replay), all through the public interface, single thread.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import random
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stage_bench import machine, replace_section  # noqa: E402
from stream_processors.pricing.dedupe import CHUNK_OPEN_MS, DedupeIndex  # noqa: E402

SECTION = "Dedupe memory"
TARGET_BYTES_PER_ID = 24
WINDOW_MS = 48 * 3_600_000
#: the previous index, measured once with this traffic (it is gone from the code)
BEFORE = (
    "the dict-based index (a tuple key and position per id, chunks holding the ids, JSON chunk values),"
    " measured the same way at 1M ids, took 502 bytes per id in all, 52 of them the table's copy: ~81 GiB"
    " for the 48 h window above."
)
START_MS = 1_750_000_000_000

#: a batch: (partition, offset, scope, event ids) per record, and the batch's time
Batch = tuple[list[tuple[int, int, str, list[str]]], int]


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


def traffic(seed: int, n_ids: int, args: argparse.Namespace) -> Iterator[Batch]:
    """Deterministic batches holding ``n_ids`` distinct ids in all."""
    rng = random.Random(seed)
    scopes = [f"tenant-{i % 17}/project-{i}" for i in range(args.scopes)]
    partition_of = {s: zlib.crc32(s.encode()) % args.partitions for s in scopes}
    next_offset = [0] * args.partitions
    per_batch = max(1, round(args.rate * args.batch_seconds))
    now_ms = START_MS
    made = 0
    while made < n_ids:
        records, in_batch = [], 0
        while in_batch < per_batch and made < n_ids:
            scope = rng.choice(scopes)
            n = min(rng.randint(1, 2 * args.per_record - 1), n_ids - made)
            ids = []
            for _ in range(n):
                h = f"{rng.getrandbits(128):032x}"
                ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
            p = partition_of[scope]
            records.append((p, next_offset[p], scope, ids))
            next_offset[p] += 1
            in_batch += n
            made += n
        yield records, now_ms
        now_ms += int(args.batch_seconds * 1000)


class Fill:
    """Runs batches through an index the way the pricing stage does, timing each part."""

    def __init__(self, index: DedupeIndex, chunk_file=None):
        self.index = index
        self.chunk_file = chunk_file
        self.open_values: dict[bytes, bytes] = {}  # a partition's open chunk: latest value
        self.open_key: dict[int, bytes] = {}
        self.lookup_s = self.insert_s = 0.0
        self.lookups = self.inserts = 0
        self.chunk_writes = self.chunk_bytes = self.expired = 0

    def batch(self, records: list[tuple[int, int, str, list[str]]], now_ms: int) -> None:
        index = self.index
        started = time.perf_counter()
        new_ids: dict[int, list[tuple[int, str, list[str]]]] = {}
        for partition, offset, scope, ids in records:
            new = [event_id for event_id in ids if index.first_seen(scope, event_id) is None]
            new_ids.setdefault(partition, []).append((offset, scope, new))
            self.lookups += len(ids)
        looked_up = time.perf_counter()
        for partition, seen in new_ids.items():
            for offset, scope, new in seen:
                position = (partition, offset)
                for event_id in new:
                    index.remember(scope, event_id, position)
                self.inserts += len(new)
        self.expired += len(index.expire(now_ms))
        written = [chunk for partition, seen in new_ids.items() for chunk in index.seal(partition, seen, now_ms)]
        done = time.perf_counter()
        self.lookup_s += looked_up - started
        self.insert_s += done - looked_up
        for chunk in written:
            self.chunk_writes += 1
            self.chunk_bytes += len(chunk.value)
            if self.chunk_file is not None:
                self.keep_latest(chunk.partition, chunk.key, chunk.value)

    def keep_latest(self, partition: int, key: bytes, value: bytes) -> None:
        """Only a chunk's last value goes to the file (what compaction leaves)."""
        previous = self.open_key.get(partition)
        if previous is not None and previous != key:
            self.write(previous, self.open_values.pop(previous))
        self.open_key[partition] = key
        self.open_values[key] = value

    def close(self) -> None:
        for key, value in self.open_values.items():
            self.write(key, value)
        self.open_values.clear()

    def write(self, key: bytes, value: bytes) -> None:
        self.chunk_file.write(struct.pack("<II", len(key), len(value)) + key + value)


def read_chunks(path: str) -> dict[bytes, bytes]:
    store: dict[bytes, bytes] = {}
    with open(path, "rb") as f:
        while header := f.read(8):
            key_len, value_len = struct.unpack("<II", header)
            key = f.read(key_len)
            store[key] = f.read(value_len)
    return store


def store_bytes(store: dict[bytes, bytes]) -> int:
    return sys.getsizeof(store) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in store.items())


def hit_lookups(index: DedupeIndex, args: argparse.Namespace, n: int) -> tuple[float, int]:
    """Seconds for ``n`` lookups of remembered ids (regenerated), checking each answer."""
    checked, elapsed = 0, 0.0
    for records, _ in traffic(args.seed, n, args):
        started = time.perf_counter()
        answers = [(index.first_seen(scope, e), (p, o)) for p, o, scope, ids in records for e in ids]
        elapsed += time.perf_counter() - started
        wrong = [a for a in answers if a[0] != a[1]]
        if wrong:
            raise AssertionError(f"{len(wrong)} remembered ids answered wrongly, e.g. {wrong[0]}")
        checked += len(answers)
    return elapsed, checked


def fill_phase(args: argparse.Namespace, chunk_path: str) -> dict:
    """Fill an index with ``--ids`` ids; its chunks go to ``chunk_path``."""
    index = DedupeIndex(WINDOW_MS)
    baseline = settled_rss()
    with open(chunk_path, "wb") as chunk_file:
        fill = Fill(index, chunk_file)
        started = time.perf_counter()
        for records, now_ms in traffic(args.seed, args.ids, args):
            fill.batch(records, now_ms)
        fill_s = time.perf_counter() - started
        fill.close()
    rss = settled_rss()
    n = len(index)
    assert n == args.ids, (n, args.ids)
    hit_s, hits = hit_lookups(index, args, args.hits)
    return {
        "n": n, "chunks": index.chunk_count, "fill_s": fill_s, "baseline": baseline, "rss": rss,
        "rss_per_id": (rss - baseline) / n, "nbytes_per_id": index.nbytes / n,
        "lookup_us": fill.lookup_s / fill.lookups * 1e6, "insert_us": fill.insert_s / fill.inserts * 1e6,
        "hit_us": hit_s / hits * 1e6, "hits": hits,
        "chunk_writes": fill.chunk_writes, "chunk_bytes_per_id": fill.chunk_bytes / n,
    }  # fmt: skip


def rebuild_phase(args: argparse.Namespace, chunk_path: str) -> dict:
    """The chunks as the Faust table's memory store holds them, and an index rebuilt from them."""
    baseline = settled_rss()
    store = read_chunks(chunk_path)
    store_rss = settled_rss() - baseline
    started = time.perf_counter()
    index = DedupeIndex(WINDOW_MS)
    index.rebuild(store.items())
    rebuild_s = time.perf_counter() - started
    index_rss = settled_rss() - baseline - store_rss
    n = len(index)
    hit_s, hits = hit_lookups(index, args, min(args.hits, 200_000))
    return {
        "n": n, "chunks": index.chunk_count, "store_rss_per_id": store_rss / n,
        "store_account_per_id": store_bytes(store) / n, "rss_per_id": index_rss / n, "rebuild_s": rebuild_s,
        "hit_us": hit_s / hits * 1e6, "peak_over_baseline": rss_bytes("VmHWM") - baseline,
        "store_and_index": store_rss + index_rss,
    }  # fmt: skip


def steady_phase(args: argparse.Namespace) -> dict:
    """Two windows' worth of ids through a window of ``--steady-window-ids``: half expired."""
    index = DedupeIndex(int(args.steady_window_ids / args.rate * 1000))
    baseline = settled_rss()
    fill = Fill(index)
    for records, now_ms in traffic(args.seed + 1, 2 * args.steady_window_ids, args):
        fill.batch(records, now_ms)
    n = len(index)
    return {"n": n, "rss_per_id": (settled_rss() - baseline) / n, "nbytes_per_id": index.nbytes / n,
            "expired": fill.expired}  # fmt: skip


def in_child(fn, *args) -> dict:
    """Run one phase in a forked child, so its RSS delta is its own (nothing freed earlier is reused)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the simulated traffic")
    parser.add_argument("--batch-seconds", type=float, default=0.2, help="batch window (the stage's default)")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--scopes", type=int, default=100)
    parser.add_argument("--per-record", type=int, default=10, help="mean events per raw record")
    parser.add_argument("--hits", type=int, default=1_000_000, help="lookups of remembered ids")
    parser.add_argument("--steady-window-ids", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write-results", action="store_true", help=f'update the "{SECTION}" section of RESULTS.md')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as tmp:
        chunk_path = str(Path(tmp) / "chunks")
        filled = in_child(fill_phase, args, chunk_path)
        rebuilt = in_child(rebuild_phase, args, chunk_path)
    steady = in_child(steady_phase, args)
    assert (rebuilt["n"], rebuilt["chunks"]) == (filled["n"], filled["chunks"]), (rebuilt, filled)

    n = filled["n"]
    worst = max(filled["rss_per_id"], filled["nbytes_per_id"], rebuilt["rss_per_id"], steady["rss_per_id"],
                steady["nbytes_per_id"])  # fmt: skip
    command = ".venv/bin/python -m bench.bench_dedupe" + "".join(
        f" --{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if name != "write_results" and value != parser.get_default(name)
    )
    window_ids = 173_000_000  # 48 h at 1,000 new ids/s
    per_id = filled["rss_per_id"] + rebuilt["store_rss_per_id"]
    lines = [
        f"## {SECTION}",
        "",
        f"Measured {machine()}, with `{command}`.",
        f"{n:,} ids: {args.scopes} scopes in {args.partitions} raw partitions, uuid-like ids, records of 1–"
        f"{2 * args.per_record - 1} ids, batches of {args.batch_seconds:g} s at {args.rate:,.0f} events/s"
        f" (simulated time), fed as `PricingStage.process` feeds the index. Chunks: {filled['chunks']:,}"
        f" ({n / filled['chunks']:,.0f} ids each on average, a partition's chunk open for up to"
        f" {CHUNK_OPEN_MS / 1000:g} s), {filled['chunk_writes']:,} chunk writes,"
        f" {filled['chunk_bytes_per_id']:.1f} changelog bytes per id. Each part ran in a forked child of its own.",
        "",
        "| what | bytes per id | how measured |",
        "|---|---|---|",
        f"| dedupe index, {n:,} ids | **{filled['rss_per_id']:.1f}** | process RSS after the fill minus before"
        " (ids generated on the fly, not kept) |",
        f"| dedupe index, its own account | {filled['nbytes_per_id']:.1f} | `DedupeIndex.nbytes` (arrays held) |",
        f"| the same ids rebuilt from the chunks | {rebuilt['rss_per_id']:.1f} | RSS after `rebuild` minus before |",
        f"| sliding window: {steady['n']:,} ids live after two windows | {steady['rss_per_id']:.1f}"
        f" (own account {steady['nbytes_per_id']:.1f}) | RSS delta; {steady['expired']:,} chunks expired, their"
        " slots swept on the way |",
        f"| Faust table's memory-store copy of the chunks (not the index) | {rebuilt['store_rss_per_id']:.1f}"
        f" (`getsizeof` {rebuilt['store_account_per_id']:.1f}) | RSS delta of a dict: chunk key → latest value |",
        "",
        "| operation | per op | ops/s |",
        "|---|---|---|",
        f"| `first_seen` of a new id (miss), during the fill | {filled['lookup_us']:.2f} µs"
        f" | {1e6 / filled['lookup_us']:,.0f} |",
        f"| `remember` + `seal` (insert, chunk encoding), during the fill | {filled['insert_us']:.2f} µs"
        f" | {1e6 / filled['insert_us']:,.0f} |",
        f"| `first_seen` of a remembered id (a retry or a replay), {n:,} ids | {filled['hit_us']:.2f} µs"
        f" | {1e6 / filled['hit_us']:,.0f} |",
        f"| the same on the rebuilt index | {rebuilt['hit_us']:.2f} µs | {1e6 / rebuilt['hit_us']:,.0f} |",
        f"| `rebuild` from {filled['chunks']:,} chunks | {rebuilt['rebuild_s']:.1f} s"
        f" | {n / rebuilt['rebuild_s']:,.0f} ids/s |",
        "",
        f"- Target ≤ {TARGET_BYTES_PER_ID} bytes per remembered id in the index: **"
        f"{'PASS' if worst <= TARGET_BYTES_PER_ID else 'FAIL'}** (worst figure above {worst:.1f})."
        f" Process RSS {filled['rss'] / 2**20:,.0f} MiB after the fill (baseline {filled['baseline'] / 2**20:,.0f}"
        f" MiB); the rebuild peaked {rebuilt['peak_over_baseline'] / 2**20:,.0f} MiB over its baseline for"
        f" {rebuilt['store_and_index'] / 2**20:,.0f} MiB held after it (store + index).",
        f"- Fill: {filled['fill_s']:.0f} s wall for {n:,} ids, id generation included. Every hit lookup was"
        " checked against the id's first position.",
        "- The stage holds the index and, in the Faust table's memory store, the chunks: a 48 h window at 1,000"
        f" new ids/s ({window_ids / 1e6:.0f}M ids) costs ≈ {filled['rss_per_id']:.0f} +"
        f" {rebuilt['store_rss_per_id']:.0f} bytes per id ≈ {window_ids * per_id / 2**30:.1f} GiB.",
        f"- Before: {BEFORE}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_results:
        replace_section(SECTION, report)
        print("updated bench/RESULTS.md")


if __name__ == "__main__":
    main()
