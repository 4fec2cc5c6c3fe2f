"""The pricing stage's dedupe state: which (scope, event_id) were seen within the window, and at
which raw position each was first seen. Pure: no Kafka, no Faust.

Why the position: a raw record redelivered after a crash (its offset was not committed) must be
priced again, byte-identical, so downstream can drop the copy by its src watermark; an id first
seen at THIS record's position is such a replay, an id first seen anywhere else is a duplicate
(see ``logic``). So the index answers ``first_seen(scope, event_id) -> (partition, offset)``.

Memory: at most 24 bytes per remembered id, 19-21 measured at 10M ids (bench/bench_dedupe.py,
bench/RESULTS.md "Dedupe memory"); the dict it replaces took ~450 (a tuple key, the id string and
a position tuple per id, and the ids again in the chunks kept in memory). The price is CPU: a
lookup hashes (~1 us) and probes in Python, an insert shifts slots; ``PricingStage.process`` spends
~4 us more per new event than with the dict (~8 instead of ~4, pricing included).

Fingerprints, not ids
    The index keeps an 80-bit fingerprint of (scope, event_id): BLAKE2b with a personalisation
    string over ``len(scope):scope event_id`` (length-prefixed, so no two pairs encode alike),
    truncated to 80 bits. A new id is taken for a duplicate (and dropped: money lost) only if a
    remembered id of the window has the same 80 bits. With n remembered ids a lookup of a new id
    collides with probability at most n / 2^80; "below 1e-12 at a billion ids" means per lookup
    with 1e9 ids remembered: 1e9 / 2^80 = 1e9 / 1.21e24 = 8.3e-16 < 1e-12. (64 bits would give
    1e9 / 1.84e19 = 5.4e-11, too much; 70 bits is the least that passes, 8.5e-13.) Over a life:
    1,000 new ids/s for ten years (3.2e11 lookups) against a full 48 h window (1.7e8 ids)
    expects 3.2e11 x 1.7e8 / 2^80 = 4.5e-5 false duplicates in all. The hash is not keyed: ids
    that collide within one's own scope can only drop one's own spend (a tenant could as well not
    send it), and to hit another scope's id an attacker needs a second preimage of 80 bits
    (~2^80 hashes) for an id it would also have to know in advance.

The table (``_FingerprintTable``)
    One slot is 16 bytes: the fingerprint's high 64 bits, and a 64-bit payload holding the chunk
    slot (32 bits), the offset of the id's record relative to its chunk's first offset (16 bits)
    and the fingerprint's low 16 bits. Slots live in 256 segments (chosen by the top 8 bits) of
    ordered linear probing: each key sits at or after its home slot, keys stay sorted, so a
    lookup stops at the first larger key and a segment is rebuilt (grown, shrunk, swept) with a
    few vectorised numpy operations. A segment is rebuilt at load 0.85 and grows at 0.93: 16 /
    0.85 = 18.8 and 16 / 0.93 = 17.2 bytes per slot-held id; ids of expired chunks stay in their
    slots until swept, and segments are swept in turn whenever those exceed 1/16 of the live ids
    (and 65,536), so a live id costs at most 18.8 x 17/16 = 20.0 bytes averaged over the table.
    Chunk metadata adds 35 bytes per chunk (partition, first offset, newest time, id count, first
    fingerprint, alive flag): 0.4 bytes per id at 90 ids per chunk, less above. Segments are
    rebuilt one at a time, in memory mapped for them (see ``_slot_array``), so growing never
    needs a second copy of the table and leaves no holes behind. The bound holds from ~1M ids:
    an empty index takes 2 MB (a page per array), and segments under 4,096 slots double when
    they grow, as rebuilds would otherwise cost a small index more than its ids.

Chunks (the persisted state)
    The table is rebuilt from chunks stored in the stage's Faust table (its changelog) after a
    restart or a rebalance. One chunk holds ids first seen in one raw partition: its partition,
    first offset, newest time and, per id, the 80-bit fingerprint and the offset delta (12 bytes;
    value = 24-byte header + 12 bytes per id, ~48 KB at ``MAX_IDS_PER_CHUNK``). A partition's
    open chunk takes the new ids of successive batches for up to ``CHUNK_OPEN_MS``, until
    ``MAX_IDS_PER_CHUNK`` ids or an offset span of 65,535; each batch rewrites it under the same
    key (compacted changelog; the table keeps the last value). Per-batch chunks would be tiny at
    a moderate rate (a 0.2 s batch spread over a dozen partitions) and cost more in chunk
    overhead than their ids. A chunk expires once its newest id is older than the window, so an
    id is remembered for at least the window and at most ``CHUNK_OPEN_MS`` longer. The Faust
    table's memory store keeps the values too: ~14 bytes per id besides the index's (it was ~52).

    Old encoding: the previous release stored chunks as JSON with the ids themselves
    (``{"partition", "first_seen_ms", "records": [[offset, scope, [ids]]]}``). A stage upgraded
    over its changelog meets them until they expire (one window), so ``decode_chunk`` still
    reads them (hashing their ids) and they are deleted under their stored key.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson

Position = tuple[int, int]  # (raw partition, raw offset)

#: ids per chunk: one changelog record stays far below the producer's 1 MB request limit
MAX_IDS_PER_CHUNK = 4_000
#: how long a partition's open chunk takes more ids: fewer, larger chunks (each costs ~35 bytes
#: here and ~200 in the Faust table's memory store) against rewriting the open one per batch
CHUNK_OPEN_MS = 1_000
#: the largest offset delta a table slot holds
MAX_OFFSET_SPAN = 0xFFFF

_PERSON = b"spendstream.dd"
_M64 = (1 << 64) - 1
#: an empty slot; sorts after every key, so a probe stops on it; a real key equal to it is
#: stored as its neighbour (one 2^-64 sliver of the key space shared by two values)
_EMPTY = _M64
_EMPTY_BYTES = _EMPTY.to_bytes(8, "little")
_SEGMENT_BITS = 8
_SEGMENTS = 1 << _SEGMENT_BITS
_SEGMENT_SHIFT = 64 - _SEGMENT_BITS
_LOAD_REBUILT = 0.85
_LOAD_GROW = 0.93
_MIN_CAPACITY = 16
#: slots past the last home slot, so runs near the end need no wrap-around
_TAIL = 16
#: sweep segments while expired slots exceed 1/_DEAD_SHARE of the live ones, and _SWEEP_FROM:
#: a small index would otherwise sweep all the time (a sweep costs ~50 µs however small)
_DEAD_SHARE = 16
_SWEEP_FROM = 1 << 16
#: segments below this many slots double when they grow: a small index (under ~900k ids) would
#: otherwise spend more on rebuilds than on its ids
_DOUBLE_BELOW = 1 << 12
#: fingerprints of missed lookups kept for the ``remember`` that usually follows
_MISS_CACHE = 65_536
#: slots per step of a rebuild: bounds its transient memory
_REBUILD_BATCH = 1 << 16

_VERSION = 2
_HEADER = struct.Struct("<B3xiqq")  # version, partition, first offset, newest_ms
_ENTRY = struct.Struct("<QHH")  # fingerprint high 64 bits, low 16 bits, offset delta
ENTRY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u2"), ("delta", "<u2")])


def fingerprint(scope: str, event_id: str) -> tuple[int, int]:
    """The 80-bit fingerprint of an id in its scope, as (high 64 bits, low 16 bits)."""
    data = f"{len(scope)}:{scope}{event_id}".encode("utf-8", "surrogatepass")
    bits = int.from_bytes(hashlib.blake2b(data, digest_size=10, person=_PERSON).digest(), "little")
    hi = bits & _M64
    return (hi if hi != _EMPTY else _EMPTY - 1), bits >> 64


def chunk_key(partition: int, first_offset: int, hi: int, lo: int) -> bytes:
    # An id is new at most once per record, so (partition, offset, first id) is unique even when
    # a huge record's ids are split over several chunks or a replay finishes a record. The "/"
    # keeps these keys apart from the old "partition:offset:event_id" ones.
    return f"{partition}:{first_offset}/{hi:016x}{lo:04x}".encode()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One changelog record of dedupe state: ids first seen in one raw partition."""

    partition: int
    key: bytes
    newest_ms: int
    #: the encoded value; None for a chunk handed out by ``expire`` (only its deletion matters)
    value: bytes | None = None

    def encode(self) -> bytes:
        if self.value is None:
            raise ValueError(f"chunk {self.key!r} was expired: only its key is left")
        return self.value


@dataclass(frozen=True, slots=True)
class ChunkContent:
    """A decoded chunk: ids (as fingerprints) first seen at ``first_offset + delta`` in ``partition``."""

    partition: int
    first_offset: int
    newest_ms: int
    #: ENTRY_DTYPE: hi, lo (the fingerprint), delta (the record's offset - first_offset)
    entries: np.ndarray

    def positions(self) -> list[tuple[tuple[int, int], Position]]:
        """(fingerprint, first-seen position) per id."""
        return [((hi, lo), (self.partition, self.first_offset + delta)) for hi, lo, delta in self.entries.tolist()]


def encode_chunk(partition: int, first_offset: int, newest_ms: int, entries: bytes) -> bytes:
    return _HEADER.pack(_VERSION, partition, first_offset, newest_ms) + entries


def decode_chunk(value: bytes) -> list[ChunkContent]:
    """A stored chunk value, in the current or the old (JSON) encoding. One content, except for
    an old chunk whose offsets span more than a slot's delta holds: one content per span."""
    if value[:1] == b"{":
        return _decode_json_chunk(value)
    if value[0] != _VERSION or (len(value) - _HEADER.size) % ENTRY_DTYPE.itemsize:
        raise ValueError(f"not a dedupe chunk (version byte {value[0]}, {len(value)} bytes)")
    _, partition, first_offset, newest_ms = _HEADER.unpack_from(value)
    entries = np.frombuffer(value, ENTRY_DTYPE, offset=_HEADER.size)
    return [ChunkContent(partition, first_offset, newest_ms, entries)]


def _decode_json_chunk(value: bytes) -> list[ChunkContent]:
    d = orjson.loads(value)
    partition, newest_ms = d["partition"], d["first_seen_ms"]
    parts: list[ChunkContent] = []
    rows: list[tuple[int, int, int]] = []
    first = 0
    for offset, scope, ids in sorted(d["records"], key=lambda r: r[0]):
        if rows and offset - first > MAX_OFFSET_SPAN:
            parts.append(ChunkContent(partition, first, newest_ms, np.array(rows, ENTRY_DTYPE)))
            rows = []
        if not rows:
            first = offset
        rows.extend((*fingerprint(scope, event_id), offset - first) for event_id in ids)
    parts.append(ChunkContent(partition, first, newest_ms, np.array(rows, ENTRY_DTYPE)))
    return parts


class _FingerprintTable:
    """Fingerprint -> payload, in ``_SEGMENTS`` segments of ordered linear probing (see the module
    docstring). Payload: chunk slot << 32 | offset delta << 16 | fingerprint low 16 bits. A slot
    whose chunk slot is not ``alive`` is garbage: lookups skip it, rebuilds drop it and report
    the chunk slots of what they dropped to ``dropped``."""

    def __init__(self, alive: bytearray, dropped: Callable[[np.ndarray], None]):
        self._alive = alive
        self._dropped = dropped
        self._keys: list[memoryview] = []
        self._payloads: list[memoryview] = []
        #: bytes each segment's two arrays take, page-rounded when mapped
        self._footprint = [0] * _SEGMENTS
        #: home slots span [0, capacity); the arrays are longer by the tail and one EMPTY sentinel
        self._capacity = [0] * _SEGMENTS
        self._grow_at = [0] * _SEGMENTS
        self._used = [0] * _SEGMENTS
        self._sweep_cursor = 0
        empty = np.empty(0, np.uint64)
        for segment in range(_SEGMENTS):
            self._keys.append(memoryview(b"").cast("Q"))
            self._payloads.append(memoryview(b"").cast("Q"))
            self._place(segment, empty, empty, _MIN_CAPACITY)

    @property
    def nbytes(self) -> int:
        return sum(self._footprint)

    def find(self, hi: int, lo: int) -> int | None:
        """The payload of the live slot holding this fingerprint."""
        segment = hi >> _SEGMENT_SHIFT
        keys = self._keys[segment]
        i = ((((hi << _SEGMENT_BITS) & _M64) >> 32) * self._capacity[segment]) >> 32
        key = keys[i]
        while key < hi:
            i += 1
            key = keys[i]
        if key != hi:
            return None
        payloads = self._payloads[segment]
        alive = self._alive
        while key == hi:
            payload = payloads[i]
            if payload & 0xFFFF == lo and alive[payload >> 32]:
                return payload
            i += 1
            key = keys[i]
        return None

    def insert(self, hi: int, payload: int) -> None:
        segment = hi >> _SEGMENT_SHIFT
        if self._used[segment] >= self._grow_at[segment]:
            self._rebuild(segment, room=1, grow=True)
        keys = self._keys[segment]
        i = ((((hi << _SEGMENT_BITS) & _M64) >> 32) * self._capacity[segment]) >> 32
        key = keys[i]
        while key < hi:
            i += 1
            key = keys[i]
        if key == _EMPTY and i < len(keys) - 1:  # the end of a run (not the sentinel): nothing to shift
            keys[i] = hi
            self._payloads[segment][i] = payload
            self._used[segment] += 1
            return
        # the run's end: the first empty slot, found by the buffer's own search (runs are long
        # at these loads); an EMPTY pattern straddling two keys is skipped
        slots = keys.obj
        end = slots.find(_EMPTY_BYTES, 8 * i)
        while end % 8:
            end = slots.find(_EMPTY_BYTES, end + 1)
        end //= 8
        if end == len(keys) - 1:  # the run would take the sentinel: rebuild with a longer tail
            self._rebuild(segment, room=1, grow=False)
            self.insert(hi, payload)
            return
        payloads = self._payloads[segment]
        slots.move(8 * i + 8, 8 * i, 8 * (end - i))
        payloads.obj.move(8 * i + 8, 8 * i, 8 * (end - i))
        keys[i] = hi
        payloads[i] = payload
        self._used[segment] += 1

    def load(self, segment: int, keys: np.ndarray, payloads: np.ndarray) -> None:
        """Replace one segment with these slots (sorted by key, in that segment)."""
        self._place(segment, keys, payloads, _capacity_for(len(keys)))

    def sweep_next(self) -> None:
        """Rebuild the next segment in turn, dropping its expired slots."""
        segment = self._sweep_cursor
        self._sweep_cursor = (segment + 1) % _SEGMENTS
        self._rebuild(segment, room=0, grow=False)

    def _rebuild(self, segment: int, room: int, grow: bool) -> None:
        keys = np.frombuffer(self._keys[segment], np.uint64)
        payloads = np.frombuffer(self._payloads[segment], np.uint64)
        occupied = keys != _EMPTY
        refs = (payloads >> 32).astype(np.int64)
        live = occupied.copy()
        live[occupied] = np.frombuffer(self._alive, np.uint8)[refs[occupied]] != 0
        dropped = refs[occupied & ~live]
        kept_keys, kept_payloads = keys[live], payloads[live]
        del keys, payloads, refs, live, occupied  # no view of the old arrays (or of alive) survives
        capacity = _capacity_for(len(kept_keys) + room)
        if grow and self._capacity[segment] < _DOUBLE_BELOW:
            capacity = max(capacity, 2 * self._capacity[segment])
        self._place(segment, kept_keys, kept_payloads, capacity)
        if len(dropped):
            self._dropped(dropped)

    def _place(self, segment: int, keys: np.ndarray, payloads: np.ndarray, capacity: int) -> None:
        n = len(keys)
        length = capacity
        if n:
            # ordered linear probing packed in one pass: slot_i = max(home_i, slot_{i-1} + 1)
            home = ((((keys << _SEGMENT_BITS) >> 32) * capacity) >> 32).astype(np.int64)
            index = np.arange(n, dtype=np.int64)
            slots = index + np.maximum.accumulate(home - index)
            length = max(capacity, int(slots[-1]) + 1)
        length += _TAIL + 1
        new_keys, footprint = _slot_array(length)
        new_payloads, _ = _slot_array(length)
        np.frombuffer(new_keys, np.uint64)[:] = _EMPTY
        if n:
            np.frombuffer(new_keys, np.uint64)[slots] = keys
            np.frombuffer(new_payloads, np.uint64)[slots] = payloads
        self._keys[segment] = new_keys
        self._payloads[segment] = new_payloads
        self._footprint[segment] = 2 * footprint
        self._capacity[segment] = capacity
        self._grow_at[segment] = int(capacity * _LOAD_GROW)
        self._used[segment] = n


def _capacity_for(n: int) -> int:
    return max(_MIN_CAPACITY, math.ceil(n / _LOAD_REBUILT))


def _slot_array(length: int) -> tuple[memoryview, int]:
    """``length`` zeroed 64-bit slots in memory of their own, and the bytes that takes (whole
    pages). Not malloc'd: segments are rebuilt larger (and swept) all the time, and on the heap
    the old arrays leave holes the new ones do not fit in, which stay resident (measured at 3M ids:
    RSS 30% above the arrays' size; mapped, within 2%). Unmapped when the last view goes."""
    size = 8 * length
    if not size:  # nothing to map
        return memoryview(bytearray()).cast("Q"), 0
    return memoryview(mmap.mmap(-1, size)).cast("Q"), -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclass(slots=True, eq=False)
class _OpenChunk:
    """A partition's newest chunk while it takes ids: its value is rewritten from ``entries``."""

    ref: int
    key: bytes
    first_offset: int
    opened_ms: int
    entries: bytearray = field(default_factory=bytearray)
    count: int = 0


class DedupeIndex:
    """(scope, event_id) -> first-seen raw position within the window, with the chunks that
    persist it.

    Chunk slots ("refs") index the per-chunk arrays; a table slot names its chunk by ref. An
    expired chunk's ref stays dead until every table slot naming it was swept, then is reused.
    Ids remembered by ``remember`` wait in ``_pending`` until ``seal`` puts them in a chunk."""

    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self._clear()

    def _clear(self) -> None:
        self._partition = array("i")
        self._first_offset = array("q")
        self._newest_ms = array("q")
        #: table slots naming the chunk (live or not yet swept)
        self._entries = array("I")
        self._first_hi = array("Q")
        self._first_lo = array("H")
        self._alive = bytearray()
        #: keys that cannot be derived from the chunk's first id: old-encoding chunks and keys
        #: that do not match their content (None: a further part of an old chunk, no key of its own)
        self._stored_keys: dict[int, bytes | None] = {}
        self._free_refs: list[int] = []
        self._table = _FingerprintTable(self._alive, self._on_dropped)
        self._pending: dict[tuple[str, str], tuple[int, int, Position]] = {}
        self._misses: dict[tuple[str, str], tuple[int, int]] = {}
        self._open: dict[int, _OpenChunk] = {}
        self._live = 0  # table slots of live chunks
        self._dead = 0  # table slots of expired chunks, not swept yet
        self._chunks = 0
        self._oldest_ms = sys.maxsize

    def __len__(self) -> int:
        return self._live + len(self._pending)

    @property
    def chunk_count(self) -> int:
        return self._chunks

    @property
    def nbytes(self) -> int:
        """Bytes held by the table, the per-chunk arrays and the open chunks (the memory that
        grows with the ids); not the ids of the current batch waiting for ``seal``."""
        arrays = (self._partition, self._first_offset, self._newest_ms, self._entries, self._first_hi,
                  self._first_lo, self._alive, self._free_refs, self._stored_keys)  # fmt: skip
        return (
            self._table.nbytes
            + sum(sys.getsizeof(a) for a in arrays)
            + sum(sys.getsizeof(k) for k in self._stored_keys.values())
            + sum(sys.getsizeof(c.entries) for c in self._open.values())
        )

    # ------------------------------------------------------------ lookups

    def first_seen(self, scope: str, event_id: str) -> Position | None:
        key = (scope, event_id)
        pending = self._pending.get(key)
        if pending is not None:
            return pending[2]
        hi, lo = fingerprint(scope, event_id)
        payload = self._table.find(hi, lo)
        if payload is None:
            if len(self._misses) >= _MISS_CACHE:
                self._misses.clear()
            self._misses[key] = (hi, lo)
            return None
        ref = payload >> 32
        return self._partition[ref], self._first_offset[ref] + ((payload >> 16) & 0xFFFF)

    def remember(self, scope: str, event_id: str, position: Position) -> None:
        key = (scope, event_id)
        hi, lo = self._misses.pop(key, None) or fingerprint(scope, event_id)
        self._pending[key] = (hi, lo, position)

    # ------------------------------------------------------------ chunks

    def seal(self, partition: int, records: list[tuple[int, str, list[str]]], now_ms: int) -> list[Chunk]:
        """Put the ids a batch first saw in ``partition`` ((offset, scope, ids) per record) into
        that partition's open chunk(s); returns the chunks to write (new or rewritten)."""
        chunk = self._open.pop(partition, None)
        if chunk is not None and now_ms - chunk.opened_ms >= CHUNK_OPEN_MS:
            chunk = None
        #: chunk -> its id count before this batch
        touched: dict[_OpenChunk, int] = {}
        pending = self._pending
        insert = self._table.insert
        pack = _ENTRY.pack
        for offset, scope, ids in records:
            for event_id in ids:
                remembered = pending.pop((scope, event_id), None)
                hi, lo = remembered[:2] if remembered is not None else fingerprint(scope, event_id)
                if (
                    chunk is None
                    or chunk.count >= MAX_IDS_PER_CHUNK
                    or not 0 <= offset - chunk.first_offset <= MAX_OFFSET_SPAN
                ):
                    chunk = self._open_chunk(partition, offset, hi, lo, now_ms)
                    touched[chunk] = 0
                elif chunk not in touched:
                    touched[chunk] = chunk.count
                delta = offset - chunk.first_offset
                chunk.entries += pack(hi, lo, delta)
                chunk.count += 1
                insert(hi, chunk.ref << 32 | delta << 16 | lo)
        if chunk is not None:
            self._open[partition] = chunk
        written = []
        for c, count_before in touched.items():
            self._entries[c.ref] += c.count - count_before
            self._live += c.count - count_before
            self._newest_ms[c.ref] = now_ms
            value = encode_chunk(partition, c.first_offset, now_ms, bytes(c.entries))
            written.append(Chunk(partition, c.key, now_ms, value))
        return written

    def _open_chunk(self, partition: int, first_offset: int, hi: int, lo: int, now_ms: int) -> _OpenChunk:
        ref = self._new_ref(partition, first_offset, now_ms, hi, lo)
        return _OpenChunk(ref, chunk_key(partition, first_offset, hi, lo), first_offset, now_ms)

    def _new_ref(self, partition: int, first_offset: int, newest_ms: int, hi: int, lo: int) -> int:
        self._chunks += 1
        self._oldest_ms = min(self._oldest_ms, newest_ms)
        if self._free_refs:
            ref = self._free_refs.pop()
            self._partition[ref], self._first_offset[ref], self._newest_ms[ref] = partition, first_offset, newest_ms
            self._first_hi[ref], self._first_lo[ref] = hi, lo
            self._entries[ref] = 0
            self._alive[ref] = 1
            return ref
        self._partition.append(partition)
        self._first_offset.append(first_offset)
        self._newest_ms.append(newest_ms)
        self._first_hi.append(hi)
        self._first_lo.append(lo)
        self._entries.append(0)
        self._alive.append(1)
        return len(self._alive) - 1

    def _key_of(self, ref: int) -> bytes | None:
        if ref in self._stored_keys:
            return self._stored_keys[ref]
        return chunk_key(self._partition[ref], self._first_offset[ref], self._first_hi[ref], self._first_lo[ref])

    def expire(self, now_ms: int, partitions: set[int] | None = None) -> list[Chunk]:
        """Forget chunks whose newest id is older than the window (only of ``partitions`` when
        given); returns them (key and partition) for deletion."""
        self._misses.clear()  # the batch's remember calls are done
        cutoff = now_ms - self.window_ms
        if self._oldest_ms >= cutoff:
            return []
        newest = np.frombuffer(self._newest_ms, np.int64)
        alive = np.frombuffer(self._alive, np.uint8) != 0
        due = alive & (newest < cutoff)
        if partitions is not None:
            due &= np.isin(np.frombuffer(self._partition, np.int32), list(partitions))
        refs = np.flatnonzero(due)
        refs = refs[np.argsort(newest[refs], kind="stable")].tolist()
        remaining = newest[alive & ~due]
        self._oldest_ms = int(remaining.min()) if len(remaining) else sys.maxsize
        del newest, alive, due, remaining  # views of arrays that grow
        expired = []
        for ref in refs:
            partition = self._partition[ref]
            key = self._key_of(ref)
            self._alive[ref] = 0
            n = self._entries[ref]
            self._live -= n
            self._dead += n
            if key is not None:
                self._chunks -= 1
                expired.append(Chunk(partition, key, self._newest_ms[ref]))
            if n == 0:
                self._release(ref)
            open_chunk = self._open.get(partition)
            if open_chunk is not None and open_chunk.ref == ref:
                del self._open[partition]
        for _ in range(_SEGMENTS):
            if self._dead <= _SWEEP_FROM or self._dead * _DEAD_SHARE <= self._live:
                break
            self._table.sweep_next()
        return expired

    def _on_dropped(self, refs: np.ndarray) -> None:
        counts = np.bincount(refs)
        for ref in np.flatnonzero(counts).tolist():
            n = int(counts[ref])
            self._entries[ref] -= n
            self._dead -= n
            if self._entries[ref] == 0:
                self._release(ref)

    def _release(self, ref: int) -> None:
        self._stored_keys.pop(ref, None)
        self._free_refs.append(ref)

    # ------------------------------------------------------------ recovery

    def rebuild(self, stored: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the state with the chunks stored in the table (after recovery). An id found in
        several chunks keeps the position of the oldest."""
        self._clear()
        decoded = sorted(((decode_chunk(value), key) for key, value in stored), key=lambda c: c[0][0].newest_ms)
        parts: list[tuple[int, np.ndarray]] = []
        for chunk_parts, key in decoded:
            for i, part in enumerate(chunk_parts):
                e = part.entries
                hi, lo = (int(e["hi"][0]), int(e["lo"][0])) if len(e) else (0, 0)
                ref = self._new_ref(part.partition, part.first_offset, part.newest_ms, hi, lo)
                if i:
                    self._stored_keys[ref] = None
                    self._chunks -= 1
                elif key != chunk_key(part.partition, part.first_offset, hi, lo):
                    self._stored_keys[ref] = key
                parts.append((ref, e))
        del decoded
        # Slots are sorted into per-segment arrays of their own (mapped, like the table's), in
        # batches of bounded size: the transient memory of a rebuild does not grow with the ids.
        per_segment = np.zeros(_SEGMENTS, np.int64)
        for keys, _ in _rebuild_batches(parts):
            per_segment += np.bincount(keys >> np.uint64(_SEGMENT_SHIFT), minlength=_SEGMENTS)
        inputs = [(_slot_array(int(n))[0], _slot_array(int(n))[0]) for n in per_segment]
        filled = np.zeros(_SEGMENTS, np.int64)
        for keys, payloads in _rebuild_batches(parts):
            segments = keys >> np.uint64(_SEGMENT_SHIFT)
            order = np.argsort(segments, kind="stable")
            keys, payloads = keys[order], payloads[order]
            bounds = np.searchsorted(segments[order], np.arange(_SEGMENTS + 1, dtype=np.uint64)).tolist()
            for segment in np.flatnonzero(np.diff(bounds)).tolist():
                start, end, at = bounds[segment], bounds[segment + 1], int(filled[segment])
                np.frombuffer(inputs[segment][0], np.uint64)[at : at + end - start] = keys[start:end]
                np.frombuffer(inputs[segment][1], np.uint64)[at : at + end - start] = payloads[start:end]
                filled[segment] += end - start
        entries = np.array([len(e) for _, e in parts], np.int64)
        del parts
        for segment in range(_SEGMENTS):
            keys = np.frombuffer(inputs[segment][0], np.uint64)
            payloads = np.frombuffer(inputs[segment][1], np.uint64)
            order = np.lexsort((payloads >> np.uint64(32), payloads & np.uint64(0xFFFF), keys))
            keys, payloads = keys[order], payloads[order]
            same = (keys[1:] == keys[:-1]) & ((payloads[1:] & 0xFFFF) == (payloads[:-1] & 0xFFFF))
            if same.any():
                keep = np.concatenate(([True], ~same))
                np.subtract.at(entries, (payloads[~keep] >> np.uint64(32)).astype(np.int64), 1)
                keys, payloads = keys[keep], payloads[keep]
            self._table.load(segment, keys, payloads)
            inputs[segment] = None  # unmapped with the last view
        self._entries = array("I", entries.astype(np.uint32).tobytes())
        self._live = int(entries.sum())


def _rebuild_batches(parts: list[tuple[int, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(fingerprint high bits, payload) of the slots of successive groups of chunk parts."""
    group: list[tuple[int, np.ndarray]] = []
    size = 0
    for ref, e in parts:
        group.append((ref, e))
        size += len(e)
        if size >= _REBUILD_BATCH:
            yield _slots_of(group)
            group, size = [], 0
    if group:
        yield _slots_of(group)


def _slots_of(group: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    e = np.concatenate([entries for _, entries in group])
    refs = np.repeat(np.array([ref for ref, _ in group], np.uint64), [len(entries) for _, entries in group])
    payloads = refs << np.uint64(32) | e["delta"].astype(np.uint64) << np.uint64(16) | e["lo"].astype(np.uint64)
    return e["hi"].copy(), payloads
