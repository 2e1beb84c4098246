"""The raw-insert baseline of ``bench/writes.py``: what the database takes without kessai.

Single-row ``INSERT`` + ``COMMIT`` of a payment-sized row from ``connections`` threads, each on
a connection of its own, into a new table ``bench_inserts`` of ``database`` (the write store) for
a fixed time: inserts/s, latency percentiles, the CPU of this process and of the database
server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import orjson

from bench.reconciler import process_cpu
from bench.stores import Stores


def raw_inserts(
    stores: Stores, database: str, *, connections: int, seconds: float, mysqld: int | None
) -> dict[str, Any]:
    """Single-row INSERT + COMMIT from ``connections`` threads for ``seconds``."""
    with stores.cursor(database) as (conn, cur):
        cur.execute(
            "CREATE TABLE bench_inserts (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " merchant_id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL,"
            " body VARCHAR(1024) NOT NULL, created_at TEXT NOT NULL)"
            if stores.sqlite
            else "CREATE TABLE bench_inserts (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " merchant_id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL,"
            " body VARCHAR(1024) NOT NULL, created_at DATETIME(6) NOT NULL)"
        )
        conn.commit()
    p = stores.param
    now_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now')" if stores.sqlite else "NOW(6)"
    insert = (
        "INSERT INTO bench_inserts (merchant_id, amount, body, created_at)"
        f" VALUES ({p}, {p}, {p}, {now_sql})"
    )
    body = orjson.dumps(
        {"merchant_id": "m00000", "user_id": "u1", "amount": 1200, "method": "balance"}
    ).decode()
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(connections + 1)
    stop_at = [0.0]

    def work(mine: list[float]) -> None:
        try:
            with stores.cursor(database) as (c, cursor):
                start_line.wait()
                while (now := time.perf_counter()) < stop_at[0]:
                    cursor.execute(insert, ("m00000", 1200, body))
                    c.commit()
                    mine.append(time.perf_counter() - now)
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                start_line.abort()

    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in latencies]
    for t in threads:
        t.start()
    cpu, db_cpu = time.process_time(), process_cpu(mysqld)
    stop_at[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    db_after = process_cpu(mysqld)
    if errors:
        raise RuntimeError(f"raw inserts failed: {errors[0]!r}") from errors[0]
    every = sorted(x for mine in latencies for x in mine)

    def pct(q: float) -> float:
        return round(every[min(len(every) - 1, max(0, round(q * len(every)) - 1))] * 1000, 2)

    return {
        "inserts": len(every),
        "elapsed_seconds": round(elapsed, 3),
        "inserts_per_second": round(len(every) / elapsed, 1),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "client_cpu_seconds": round(time.process_time() - cpu, 2),
        "db_cpu_seconds": None
        if db_cpu is None or db_after is None
        else round(db_after - db_cpu, 2),
    }
