"""How fast the projector applies a preloaded topic, against raw batched upserts of its rows.

``python -m bench.projector [--events 1000000] [--db-url mysql+pymysql://root@127.0.0.1:3306]
[--json out.json]``

1. Starts a private embedded broker (Tansu, ``kessai.broker.EmbeddedBroker`` on a free port)
   and creates the topic with ``kessai.broker.ensure_topic``, as every kessai component does.
2. Builds ``--events`` events with the real event classes (the plan of ``bench.reconciler``:
   payments captured over ``--days`` days, 5% refunded once, a fifth of those twice; one
   merchant with 30% of the payments, a Zipf tail; 5% in USD; one merchant in ten in another
   time zone) and publishes them exactly as the relay does: key = payment id, partition from
   aiokafka's default partitioner, the relay's headers, in the order the events happened, with
   ``send_batch`` per partition (no waiting for each record). The topic's real end offsets
   (fetch high watermarks) must add up to ``--events``.
3. Measures, in this order:
   - **baseline (before)**: into a fresh, migrated read database, the rows the projector would
     write for those events, through PyMySQL's ``executemany`` of multi-row ``INSERT ... ON
     DUPLICATE KEY UPDATE``: per batch of ``--batch-size`` records (the projector's batch
     size; records taken partition after partition, in offset order, as a consumer receives
     them), the upserted ``payments`` rows (state after the batch), the ``refunds`` rows, and
     the day and hour totals' increments, each statement sorted by primary key, one
     transaction per batch, one connection. The rows are computed before the clock starts: this
     is what the server and the driver do at best with what the projector writes;
   - **projector**: the real projector (``kessai projector``, a subprocess) against another
     fresh read database, from its start until its stored offsets reach the end of the log
     (polled in the read database, where each batch's offsets are committed with its effects).
     Reported twice: from the process's start (imports and joining the consumer group
     included), and from its first applied batch to its last (the rate the target is about);
   - the check (below), then both databases are dropped;
   - **baseline (after)**, into a third fresh database, the only one of the run left on the
     server, as for the first. Ratios divide by the mean of the two baseline rates.
4. The check: the projector's read database must hold the payments per currency with their
   captured and refunded sums, the refunds, and the sums of both totals tables that the
   preloaded events imply, no parked event and no dead letter; and every payment, refund and
   totals row must equal the first baseline's. Any difference fails the benchmark. Each
   baseline's database is checked against the events the same way.
5. Prints the figures and the machine, writes them as JSON with ``--json``; stops the broker
   and the projector and drops every database it created, also on failure and Ctrl-C.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs the same on the embedded default: the three
read databases are SQLite files in a temporary directory (under DIR), deleted where the server's
are dropped and with the directory at the end; the baseline is the stdlib ``sqlite3`` driver's
``executemany`` of ``INSERT ... ON CONFLICT (primary key) DO UPDATE`` (the statement
``kessai.db.upsert`` issues on SQLite), the same rows per batch, one transaction per batch, with
times converted to SQLite's text form before the clock starts; the row check attaches the
baseline's file. SQLite runs inside the processes, so there is no server CPU to report.

CPU seconds are read from ``/proc`` (the projector process, this process for the baseline,
and the MariaDB server, which includes whatever else used it meanwhile); peak RSS is the
projector's ``VmHWM``. ``--profile FILE`` attaches py-spy (``pip install py-spy``) to the
projector process for its whole run (``.svg`` flame graph, ``.json`` speedscope, anything else
collapsed stacks).
"""

from __future__ import annotations

from bench.projector.command import cli, main

__all__ = ["cli", "main"]
