"""UUIDv7 ids: valid, strictly increasing, their timestamps stay on the clock, and a time is a
bound on them (the watermark)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

from kessai.ids import bound_at, bound_at_ms, new_id, time_of, timestamp_ms


def test_ids_are_version_7_rfc_variant_and_strictly_increasing() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_burst_of_ids_does_not_run_ahead_of_the_clock() -> None:
    """100,000 ids as fast as possible: every timestamp is at most the clock's reading right
    after it was made (a generator that adds a millisecond per id would be ~100 s ahead)."""
    before = time.time_ns() // 1_000_000
    for _ in range(100_000):
        made = new_id()
        assert timestamp_ms(made) <= time.time_ns() // 1_000_000
    assert timestamp_ms(made) >= before


def test_ids_from_many_threads_are_unique() -> None:
    results: list[list[uuid.UUID]] = [[] for _ in range(8)]

    def work(out: list[uuid.UUID]) -> None:
        out.extend(new_id() for _ in range(5_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in results for i in out]
    assert len(set(every)) == len(every)
    assert all(out == sorted(out) for out in results)


def test_a_watermark_is_a_bound_of_the_ids_of_its_time() -> None:
    moment = datetime(2026, 12, 2, 7, 30, 0, 123_000, tzinfo=UTC)
    assert time_of(str(bound_at(moment))) == "2026-12-02 07:30:00.123"
    assert timestamp_ms(bound_at(moment)) == int(moment.timestamp() * 1000)
    assert bound_at(moment) <= new_id()
    assert bound_at_ms(-5) == uuid.UUID(int=0)
    assert time_of(None) == "-"
