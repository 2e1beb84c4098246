"""How fast the query API answers the merchant dashboard over a large read database, against
a bare GET endpoint on the same server.

``python -m bench.queries [--payments 1000000] [--connections 32] [--seconds 5] [--workers 2]
[--rate R | --rate-share 0.5] [--db-url mysql+pymysql://root@127.0.0.1:3306] [--json out.json]``

1. Creates a fresh read database and key store on the server (``kessai_bench_<hex>_r`` /
   ``_k``), migrates them with ``migrations.upgrade``, and creates one API key reading every
   merchant (``merchant:<id>:read``).
2. Loads the read side the projector would have written for ``--payments`` payments, generated
   by the server itself (``INSERT ... SELECT`` over MariaDB's Sequence engine, columns from
   CRC32 of the sequence number, so the data set is the same for the same seed): payments
   captured over ``--days`` days up to 10 minutes ago, one merchant (``m00000``) with 30% of
   them, the others a Zipf tail (``kessai_cli.loadgen.merchant_weights``); 5% in USD; 5% refunded
   once, a fifth of the partly refunded ones a second time; ids UUIDv7-like in time order; one
   merchant in ten in Asia/Kolkata (a ``merchants`` row), the others in the default zone. The
   hour totals are grouped from the same generated columns, chunk by chunk, on an integer key
   (merchant, local hour in its zone, currency); the day totals from the hour totals. The
   payments' secondary indexes are dropped while loading and built again afterwards, exactly
   as the migration defines them.
3. Checks that the query API answers what was loaded (summaries against sums of the rows, list
   pages and a whole paged walk against the rows, a payment's refunds), and records
   ``ANALYZE`` (EXPLAIN with actual rows and times) of the statements the API issues.
4. Serves the real query API (``kessai query-api --workers N``, rate limits out of the way,
   caches as configured) and ``bench/bare_app.py``'s bare GET endpoint (no database, no key)
   with the same worker count, and drives each kind of request closed-loop over
   ``--connections`` keep-alive connections (the client of ``kessai_cli/loadgen.py``) for
   ``--seconds`` after ``--warmup``: bare GET with a summary-sized and a page-sized body (before
   and after the others), summaries (today through the cache, today without it, 7 and 30 days
   by day, 7 days by hour) and list pages (first pages, then pages following ``next_cursor``),
   each for the big merchant and for random tail merchants.
   Right after each kind's closed-loop run, the same kind open-loop at a stated rate
   (``--rate``, or ``--rate-share`` of the req/s it just reached closed-loop: half by
   default), requests sent on schedule by ``kessai_cli.loadgen``'s scheduler and their latency
   counted from when they were due; then the bare endpoint with the kind's body size at the
   same rate.
5. Prints req/s, latency p50/p90/p99/max per kind (closed loop: the saturation figures), their
   ratios to the bare baseline, CPU of client, API and database server, the open-loop
   latencies beside the bare endpoint's at the same rate, the API processes' peak RSS
   (``VmHWM``), the targets against the open-loop p99, and the machine; writes them as JSON
   with ``--json``; drops the databases (unless ``--keep``), also on failure and Ctrl-C.
   ``--reuse NAME`` measures a kept read database again.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs it on the embedded default: the read database
and the key store are SQLite files in a temporary directory, removed at the end; the same rows
are computed in Python and loaded through the stdlib ``sqlite3`` driver
(``bench/queries_sqlite.py``); SQLite's ``EXPLAIN QUERY PLAN`` stands for ``ANALYZE`` (no
actual rows or times); there is no database CPU or connection count (SQLite runs inside the
query API's workers); ``--keep`` and ``--reuse`` need a server.

``--profile FILE --profile-kind KEY`` samples the query API processes with py-spy
(``pip install py-spy``) during one kind's measured run.
"""

from __future__ import annotations

from bench.queries.command import RATE_SHARE, cli, main, stated_rate

__all__ = ["RATE_SHARE", "cli", "main", "stated_rate"]
