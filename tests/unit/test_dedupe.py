"""The pricing stage's dedupe index: duplicates, scopes, the replay rule, expiry, chunks (both
encodings), rebuild, the fingerprint table under collisions, and its memory bound."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from stream_processors.pricing import dedupe
from stream_processors.pricing.dedupe import (
    CHUNK_OPEN_MS,
    ENTRY_DTYPE,
    MAX_IDS_PER_CHUNK,
    MAX_OFFSET_SPAN,
    DedupeIndex,
    _FingerprintTable,
    chunk_key,
    decode_chunk,
    encode_chunk,
    fingerprint,
)

HOUR_MS = 3_600_000
WINDOW_MS = 48 * HOUR_MS
NOW = 1_750_000_000_000


def see(index: DedupeIndex, partition: int, offset: int, scope: str, ids: list[str], now_ms: int = NOW) -> dict:
    """One record through the index as the stage does it: look up, remember the new ids, seal.
    Returns the chunk writes (key -> value)."""
    new = [event_id for event_id in ids if index.first_seen(scope, event_id) is None]
    for event_id in new:
        index.remember(scope, event_id, (partition, offset))
    return {c.key: c.encode() for c in index.seal(partition, [(offset, scope, new)], now_ms)}


def test_a_duplicate_within_the_window_is_found_at_its_first_position():
    index = DedupeIndex(WINDOW_MS)
    see(index, 3, 100, "t1/p1", ["a", "b"])
    assert index.first_seen("t1/p1", "a") == (3, 100)
    # a client retry hours later, at another position: the first position is what it finds
    see(index, 3, 250, "t1/p1", ["a", "c"], NOW + 40 * HOUR_MS)
    assert index.first_seen("t1/p1", "a") == (3, 100)
    assert index.first_seen("t1/p1", "c") == (3, 250)
    assert len(index) == 3


def test_remembered_ids_are_found_before_they_are_sealed():
    # a later record of the same batch must see the ids of an earlier one
    index = DedupeIndex(WINDOW_MS)
    assert index.first_seen("t1/p1", "a") is None
    index.remember("t1/p1", "a", (0, 7))
    assert index.first_seen("t1/p1", "a") == (0, 7)
    assert len(index) == 1
    index.seal(0, [(7, "t1/p1", ["a"])], NOW)
    assert index.first_seen("t1/p1", "a") == (0, 7)
    assert len(index) == 1


def test_the_same_id_in_another_scope_is_not_a_duplicate():
    index = DedupeIndex(WINDOW_MS)
    see(index, 0, 1, "t1/p1", ["a"])
    assert index.first_seen("t1/p2", "a") is None
    assert index.first_seen("t2/p1", "a") is None
    # the length prefix keeps "t1/p" + "1a" apart from "t1/p1" + "a"
    assert index.first_seen("t1/p", "1a") is None
    see(index, 0, 2, "t1/p2", ["a"])
    assert index.first_seen("t1/p2", "a") == (0, 2)
    assert index.first_seen("t1/p1", "a") == (0, 1)


def test_a_redelivered_record_finds_its_own_position_before_and_after_a_restart():
    # the stage prices an id again when its first position is the record's own (a replay after
    # a crash) and drops it otherwise: the index must give back exactly that position
    index = DedupeIndex(WINDOW_MS)
    table = see(index, 2, 40, "t1/p1", ["a", "b"])
    table |= see(index, 2, 41, "t1/p1", ["b", "c"])
    for i in (index, rebuilt(table)):
        assert [i.first_seen("t1/p1", e) for e in "abc"] == [(2, 40), (2, 40), (2, 41)]


def test_ids_expire_once_their_chunk_is_older_than_the_window():
    index = DedupeIndex(WINDOW_MS)
    written = see(index, 0, 1, "t1/p1", ["a"])
    see(index, 1, 1, "t1/p1", ["b"], NOW + HOUR_MS)
    assert index.expire(NOW + WINDOW_MS - 1) == []
    assert index.first_seen("t1/p1", "a") == (0, 1)
    expired = index.expire(NOW + WINDOW_MS + 1)
    # the deletion names the key the chunk was written under
    assert [(c.partition, c.key) for c in expired] == [(0, next(iter(written)))]
    assert index.first_seen("t1/p1", "a") is None
    assert index.first_seen("t1/p1", "b") == (1, 1)
    assert (len(index), index.chunk_count) == (1, 1)
    # once forgotten, the id is new again
    see(index, 0, 9, "t1/p1", ["a"], NOW + WINDOW_MS + 2)
    assert index.first_seen("t1/p1", "a") == (0, 9)


def test_only_the_owned_partitions_expire():
    index = DedupeIndex(WINDOW_MS)
    see(index, 0, 1, "t1/p1", ["a"])
    see(index, 1, 1, "t1/p2", ["b"])
    assert [c.partition for c in index.expire(NOW + WINDOW_MS + 1, partitions={1})] == [1]
    assert index.first_seen("t1/p1", "a") == (0, 1)
    assert [c.partition for c in index.expire(NOW + WINDOW_MS + 2, partitions={0, 1})] == [0]


def test_an_open_chunk_takes_later_batches_under_its_key_then_a_new_one_starts():
    index = DedupeIndex(WINDOW_MS)
    first = see(index, 0, 10, "t1/p1", ["a"])
    again = see(index, 0, 11, "t1/p1", ["b"], NOW + CHUNK_OPEN_MS - 1)
    assert first.keys() == again.keys()
    [part] = decode_chunk(next(iter(again.values())))
    assert part.newest_ms == NOW + CHUNK_OPEN_MS - 1
    assert [pos for _, pos in part.positions()] == [(0, 10), (0, 11)]
    later = see(index, 0, 12, "t1/p1", ["c"], NOW + CHUNK_OPEN_MS)
    assert later.keys().isdisjoint(first.keys())
    assert index.chunk_count == 2
    # a replay adds nothing, so writes nothing
    assert see(index, 0, 12, "t1/p1", ["c"], NOW + CHUNK_OPEN_MS + 1) == {}


def test_chunks_split_at_the_id_limit_and_the_offset_span():
    index = DedupeIndex(WINDOW_MS)
    ids = [f"e{i}" for i in range(MAX_IDS_PER_CHUNK + 5)]
    chunks = index.seal(0, [(100, "t/p", ids[:10]), (101, "t/p", ids[10:])], NOW)
    assert [len(decode_chunk(c.encode())[0].entries) for c in chunks] == [MAX_IDS_PER_CHUNK, 5]
    assert len({c.key for c in chunks}) == 2
    far = index.seal(0, [(101 + MAX_OFFSET_SPAN, "t/p", ["x"]), (102 + MAX_OFFSET_SPAN, "t/p", ["y"])], NOW)
    # "x" still fits the open chunk (first offset 101: delta 65,535); "y" does not
    assert [decode_chunk(c.encode())[0].first_offset for c in far] == [101, 102 + MAX_OFFSET_SPAN]
    assert index.first_seen("t/p", "y") == (0, 102 + MAX_OFFSET_SPAN)
    assert index.first_seen("t/p", "x") == (0, 101 + MAX_OFFSET_SPAN)


def test_chunk_encoding_round_trip():
    entries = [(*fingerprint("t/p", f"e{i}"), i % 3) for i in range(50)]
    value = encode_chunk(7, 1_000_000, NOW, np.array(entries, ENTRY_DTYPE).tobytes())
    [part] = decode_chunk(value)
    assert (part.partition, part.first_offset, part.newest_ms) == (7, 1_000_000, NOW)
    assert part.positions() == [((hi, lo), (7, 1_000_000 + d)) for hi, lo, d in entries]
    with pytest.raises(ValueError, match="not a dedupe chunk"):
        decode_chunk(value[:-1])


def test_rebuild_after_a_restart_answers_as_before():
    index = DedupeIndex(WINDOW_MS)
    rng = random.Random(3)
    table: dict[bytes, bytes] = {}
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(20_000)]
    for batch in range(40):
        now = NOW + batch * 300
        records = []
        for r in range(10):
            offset = batch * 10 + r
            scope = f"t/p{offset % 4}"
            new = [e for e in ids[offset * 50 : offset * 50 + 50] if index.first_seen(scope, e) is None]
            for e in new:
                index.remember(scope, e, (offset % 2, offset))
            records.append((offset % 2, (offset, scope, new)))
        for partition in (0, 1):
            for chunk in index.seal(partition, [rec for p, rec in records if p == partition], now):
                table[chunk.key] = chunk.encode()
    restarted = rebuilt(table)
    assert (len(restarted), restarted.chunk_count) == (len(index), index.chunk_count) == (20_000, len(table))
    for offset in range(0, 400, 7):
        scope = f"t/p{offset % 4}"
        for e in ids[offset * 50 : offset * 50 + 50 : 9]:
            assert restarted.first_seen(scope, e) == index.first_seen(scope, e) == (offset % 2, offset)
        assert restarted.first_seen(f"t/p{(offset + 1) % 4}", ids[offset * 50]) is None
    # both expire the same chunks, under the keys they were stored with
    later = NOW + WINDOW_MS + 40 * 300
    assert sorted(c.key for c in restarted.expire(later)) == sorted(c.key for c in index.expire(later)) == sorted(table)


def test_chunks_of_the_old_json_encoding_are_read_and_deleted_under_their_key():
    # what the previous release wrote: {"partition", "first_seen_ms", "records": [[offset, scope, ids]]}
    old_key = b"4:10:a"
    old_value = orjson.dumps(
        {"partition": 4, "first_seen_ms": NOW, "records": [[10, "t1/p1", ["a", "b"]], [12, "t1/p2", ["a"]]]}
    )
    # one whose offsets span more than a slot's delta holds (a batch of over 65,535 records)
    far_key = b"4:20:z"
    far_records = [[20, "t/p", ["z"]], [20 + 2 * MAX_OFFSET_SPAN, "t/p", ["y"]]]
    far_value = orjson.dumps({"partition": 4, "first_seen_ms": NOW + 1, "records": far_records})
    index = rebuilt({old_key: old_value, far_key: far_value})
    assert index.first_seen("t1/p1", "a") == (4, 10)
    assert index.first_seen("t1/p1", "b") == (4, 10)
    assert index.first_seen("t1/p2", "a") == (4, 12)
    assert index.first_seen("t/p", "y") == (4, 20 + 2 * MAX_OFFSET_SPAN)
    assert (len(index), index.chunk_count) == (5, 2)
    assert [c.key for c in index.expire(NOW + WINDOW_MS + 2)] == [old_key, far_key]
    assert (len(index), index.chunk_count) == (0, 0)


def test_an_id_in_two_stored_chunks_keeps_the_oldest_position():
    older = encode_chunk(0, 5, NOW, np.array([(*fingerprint("t/p", "a"), 0)], ENTRY_DTYPE).tobytes())
    newer = encode_chunk(0, 9, NOW + 10, np.array([(*fingerprint("t/p", "a"), 0)], ENTRY_DTYPE).tobytes())
    index = rebuilt({b"k-newer": newer, b"k-older": older})
    assert index.first_seen("t/p", "a") == (0, 5)
    assert (len(index), index.chunk_count) == (1, 2)


def test_the_table_keeps_fingerprints_that_share_their_high_bits_apart():
    alive = bytearray([1, 1, 0])
    dropped: list[int] = []
    table = _FingerprintTable(alive, lambda refs: dropped.extend(refs.tolist()))
    hi = 0x1234_5678_9ABC_DEF0
    neighbours = [hi - 1, hi + 1, hi + 2]
    for lo in range(40):  # enough to grow the segment several times
        table.insert(hi, (lo % 3) << 32 | lo << 16 | lo)
    for key in neighbours:
        table.insert(key, 1 << 32 | 7)
    for lo in range(40):
        payload = table.find(hi, lo)
        # slots of a dead chunk (ref 2) are not found
        assert payload == (None if lo % 3 == 2 else (lo % 3) << 32 | lo << 16 | lo)
    assert table.find(hi, 40) is None
    assert [table.find(key, 7) for key in neighbours] == [1 << 32 | 7] * 3
    for _ in range(256):
        table.sweep_next()
    assert sorted(dropped) == [2] * 13
    assert [table.find(hi, lo) is not None for lo in range(6)] == [True, True, False] * 2


def test_keys_crowding_the_end_of_a_segment_grow_its_tail():
    # every key here has its home in the segment's last slot, each larger than the ones before:
    # the run fills the tail and would take the sentinel that stops every probe
    table = _FingerprintTable(bytearray([1]), lambda refs: None)
    keys = [(7 << 56) | ((1 << 56) - 200 + k) for k in range(200)]
    for n, key in enumerate(keys, 1):
        table.insert(key, n)
        assert table.find(key, n & 0xFFFF) == n
    assert [table.find(key, n & 0xFFFF) for n, key in enumerate(keys, 1)] == list(range(1, 201))
    assert table.find((7 << 56) | ((1 << 56) - 1000), 0) is None


def test_against_a_plain_dict_through_growth_expiry_and_sweeps(monkeypatch):
    # a small index sweeps only past _SWEEP_FROM expired slots: lowered, so this one sweeps too
    monkeypatch.setattr(dedupe, "_SWEEP_FROM", 0)
    window_ms = 10_000
    index = DedupeIndex(window_ms)
    model: dict[tuple[str, str], tuple[tuple[int, int], int]] = {}  # -> (position, time seen)
    rng = random.Random(5)
    pool = [f"id-{i}" for i in range(30_000)]
    offsets = [0, 0, 0]
    now = NOW
    for step in range(300):
        now += rng.choice([50, 200, 1_000])
        new_ids: dict[int, list] = {}
        for _ in range(rng.randint(1, 8)):
            partition = rng.randrange(3)
            offset = offsets[partition]
            offsets[partition] += 1
            scope = f"t/p{partition}-{rng.randrange(2)}"
            ids = list(dict.fromkeys(rng.sample(pool, rng.randint(1, 40))))
            new = []
            for e in ids:
                seen = index.first_seen(scope, e)
                expected = model.get((scope, e))
                if expected is not None and now - expected[1] < window_ms:
                    assert seen == expected[0]  # never forgotten within the window
                if seen is None:
                    new.append(e)
                    model[(scope, e)] = ((partition, offset), now)
                elif expected is not None:
                    assert seen == expected[0]
            for e in new:
                index.remember(scope, e, (partition, offset))
            new_ids.setdefault(partition, []).append((offset, scope, new))
        index.expire(now)
        for partition, records in new_ids.items():
            index.seal(partition, records, now)
        if step % 20 == 0:  # kept at most CHUNK_OPEN_MS past the window
            stale = [key for key, (_, t) in model.items() if now - t > window_ms + CHUNK_OPEN_MS]
            assert all(index.first_seen(*key) is None for key in stale)
        live = sum(1 for _, t in model.values() if now - t <= window_ms)
        assert live <= len(index) <= sum(1 for _, t in model.values() if now - t <= window_ms + CHUNK_OPEN_MS)
    assert index._dead * 16 <= index._live  # expired slots were swept as they piled up


def test_memory_stays_within_24_bytes_per_id_at_a_million_ids():
    index = DedupeIndex(WINDOW_MS)
    rng = np.random.default_rng(11)
    n, per_chunk = 1_000_000, MAX_IDS_PER_CHUNK
    table = {}
    for c in range(n // per_chunk):
        entries = np.zeros(per_chunk, ENTRY_DTYPE)
        entries["hi"] = rng.integers(0, 2**64 - 1, per_chunk, dtype=np.uint64)
        entries["lo"] = rng.integers(0, 2**16, per_chunk, dtype=np.uint16)
        entries["delta"] = np.arange(per_chunk) // 10
        hi, lo = int(entries["hi"][0]), int(entries["lo"][0])
        table[chunk_key(c % 12, c * 1000, hi, lo)] = encode_chunk(c % 12, c * 1000, NOW + c, entries.tobytes())
    index.rebuild(table.items())
    assert len(index) == n
    assert index.nbytes / len(index) <= 24
    # ids arriving one by one grow the segments up to their rebuild load
    for batch in range(25):
        ids = [f"{batch}-{i}" for i in range(5_000)]
        for e in ids:
            index.remember("t/p", e, (0, batch))
        index.seal(0, [(batch, "t/p", ids)], NOW + 10_000 + batch)
    assert len(index) == n + 125_000
    assert index.nbytes / len(index) <= 24
    # half expired: swept as they pile up, so the live ids still pay for the dead slots
    index.expire(NOW + WINDOW_MS + n // per_chunk // 2)
    assert len(index) == n // 2 + 125_000
    assert index.nbytes / len(index) <= 24


def rebuilt(table: dict[bytes, bytes]) -> DedupeIndex:
    index = DedupeIndex(WINDOW_MS)
    index.rebuild(table.items())
    return index


def test_fingerprints_are_pinned():
    # stored chunks hold fingerprints: a changed function would forget a whole window of ids
    assert fingerprint("acme/proj-7", "0190f3a2-7b1c-7d3e-9a4b-1c2d3e4f5a6b") == (14508593457967944950, 6159)
