"""Before measuring: the query API answers what was loaded, and what it asks the database."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from sqlalchemy import event

from bench.queries.dataset import PAGE_SIZE, TOTAL_COLUMNS, merchant_id, zone_of
from kessai.schema.read import payments as payments_table
from kessai.settings import Settings
from query_service import repository
from query_service.cursor import Position
from query_service.engine import create_read_only_engine
from query_service.routes.summary import totals

# -- the sanity check --------------------------------------------------------------------------


class Client:
    """Blocking GETs against a served API, for the checks (not for measuring)."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def get(self, path: str, **params: Any) -> Any:
        query = urlencode({k.rstrip("_"): v for k, v in params.items() if v is not None})
        request = urllib.request.Request(
            f"{self.url}{path}{'?' + query if query else ''}",
            headers={"Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return orjson.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET {path} {params}: {exc.code} {exc.read()[:500]!r}") from None


def check(client: Client, read_url: str, settings: Settings, merchants: int) -> dict[str, Any]:
    """The query API answers what was loaded; raises otherwise. Returns what was compared."""
    engine = sa.create_engine(read_url)
    compared: dict[str, Any] = {"summaries": [], "pages": 0, "walked_payments": 0}
    p = "?" if engine.dialect.name == "sqlite" else "%s"  # the raw driver's parameters
    try:
        with engine.connect() as conn:
            picks = ["m00000", merchant_id(1), merchant_id(10)]
            picks += [merchant_id(merchants - 1), merchant_id(merchants // 2 + 1)]
            for merchant in dict.fromkeys(picks):
                expected = _check_summary(client, conn, p, merchant, settings)
                if expected is None:
                    continue
                compared["summaries"].append(
                    {"merchant": merchant, "zone": zone_of(merchant, settings).key, **expected}
                )
                total = sum(v["payments_count"] for v in expected["totals"].values())
                _check_pages(client, conn, p, merchant, total, compared)
            _check_detail(client, conn, compared)
    finally:
        engine.dispose()
    return compared


def _expected_totals(conn: sa.Connection, p: str, merchant: str) -> dict[str, dict[str, int]]:
    """Every row: payments of the merchant, refunds of the merchant (all in range)."""
    expected: dict[str, dict[str, int]] = {}
    for currency, n, amount in conn.exec_driver_sql(
        "SELECT currency, COUNT(*), SUM(captured_amount) FROM payments"
        f" WHERE merchant_id = {p} GROUP BY currency",
        (merchant,),
    ):
        expected.setdefault(currency, dict.fromkeys(TOTAL_COLUMNS, 0)).update(
            payments_count=int(n), payments_amount=int(amount)
        )
    for currency, n, amount in conn.exec_driver_sql(
        "SELECT currency, COUNT(*), SUM(amount) FROM refunds"
        f" WHERE merchant_id = {p} GROUP BY currency",
        (merchant,),
    ):
        expected.setdefault(currency, dict.fromkeys(TOTAL_COLUMNS, 0)).update(
            refunds_count=int(n), refunds_amount=int(amount)
        )
    return expected


def _check_summary(
    client: Client, conn: sa.Connection, p: str, merchant: str, settings: Settings
) -> dict[str, Any] | None:
    """The merchant's summary over all its days against its rows, and today by hour against
    today by day; ``{"totals": ...}`` compared, or ``None`` for a merchant without payments."""
    zone = zone_of(merchant, settings)
    (first,) = conn.exec_driver_sql(
        f"SELECT MIN(created_at) FROM payments WHERE merchant_id = {p}",
        (merchant,),
    ).one()
    if first is None:
        return None
    today = datetime.now(zone).date()
    if isinstance(first, str):  # SQLite's text
        first = datetime.fromisoformat(first)
    start = first.replace(tzinfo=UTC).astimezone(zone).date()
    expected = _expected_totals(conn, p, merchant)
    body = client.get(
        f"/v1/merchants/{merchant}/summary",
        from_=start.isoformat(),
        to=today.isoformat(),
    )
    got = {c["currency"]: {k: c[k] for k in TOTAL_COLUMNS} for c in body["currencies"]}
    if got != expected or body["time_zone"] != zone.key:
        raise RuntimeError(
            f"summary of {merchant} ({body['time_zone']}): {got}, rows say {expected}"
        )
    series = sum(b["payments_count"] for c in body["currencies"] for b in c["buckets"])
    if series != sum(v["payments_count"] for v in expected.values()):
        raise RuntimeError(f"summary of {merchant}: buckets do not add up")
    # Today by hour (the cached path) against today by day (uncached).
    hourly = client.get(f"/v1/merchants/{merchant}/summary", granularity="hour")
    daily = client.get(
        f"/v1/merchants/{merchant}/summary",
        from_=today.isoformat(),
        to=today.isoformat(),
    )
    if _totals(hourly) != _totals(daily):
        raise RuntimeError(f"today of {merchant}: by hour {hourly}, by day {daily}")
    return {"totals": expected}


def _check_pages(
    client: Client, conn: sa.Connection, p: str, merchant: str, total: int, compared: dict[str, Any]
) -> None:
    """The first page, and the whole walk for merchants of a few thousand payments."""
    rows = conn.exec_driver_sql(
        f"SELECT payment_id FROM payments WHERE merchant_id = {p}"
        " ORDER BY created_at DESC, payment_id DESC LIMIT 50",
        (merchant,),
    ).all()
    page = client.get(f"/v1/merchants/{merchant}/payments")
    if [uuid.UUID(i["payment_id"]).bytes for i in page["items"]] != [bytes(r[0]) for r in rows]:
        raise RuntimeError(f"first page of {merchant} differs from the rows")
    compared["pages"] += 1
    if total > 5_000:
        return
    seen: set[str] = set()
    cursor = None
    while True:
        page = client.get(f"/v1/merchants/{merchant}/payments", limit=500, cursor=cursor)
        compared["pages"] += 1
        seen.update(i["payment_id"] for i in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    if len(seen) != total:
        raise RuntimeError(f"walk of {merchant}: {len(seen)} of {total} payments")
    compared["walked_payments"] += total


def _check_detail(client: Client, conn: sa.Connection, compared: dict[str, Any]) -> None:
    """A payment refunded twice, with its refunds."""
    row = conn.exec_driver_sql(
        "SELECT payment_id, refunded_amount, merchant_id FROM payments WHERE version = 3 LIMIT 1"
    ).first()
    if row is None:
        return
    detail = client.get(f"/v1/payments/{uuid.UUID(bytes=bytes(row[0]))}")
    if (
        len(detail["refunds"]) != 2
        or sum(r["amount"] for r in detail["refunds"]) != row[1]
        or detail["refunded_amount"] != row[1]
        or detail["status"] not in ("partially_refunded", "refunded")
    ):
        raise RuntimeError(f"payment detail differs from the rows: {detail}")
    compared["payment_detail"] = str(uuid.UUID(bytes=bytes(row[0])))


def _totals(body: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {c["currency"]: {k: c[k] for k in TOTAL_COLUMNS} for c in body["currencies"]}


# -- what the API asks the database ------------------------------------------------------------


def explain(read_url: str, settings: Settings, merchants: int) -> list[dict[str, Any]]:
    """``ANALYZE`` (run, with actual rows and times) of the statements the query API issues,
    captured from the query API's own SQL (``query_service.repository`` for the lists,
    ``query_service.routes.summary`` for the summaries)."""
    engine = create_read_only_engine(read_url, pool_size=1)
    captured: list[tuple[str, Any]] = []
    # SQLite has no ANALYZE of a statement (actual rows and times): its plan only.
    analyze = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "ANALYZE"

    @event.listens_for(engine, "before_cursor_execute")
    def _capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith(analyze):
            captured.append((statement, parameters))

    out: list[dict[str, Any]] = []
    try:
        with engine.connect() as conn:
            for name, run in _explained_reads(conn, settings, merchants):
                captured.clear()
                run()
                statement, parameters = captured[-1]
                out.append(_explained(conn, analyze, name, statement, parameters))
            conn.rollback()
    finally:
        engine.dispose()
    return out


def _explained_reads(
    conn: sa.Connection, settings: Settings, merchants: int
) -> list[tuple[str, Callable[[], object]]]:
    """The reads to explain, by name: list pages and summaries as the API asks for them."""
    tail = merchant_id(min(merchants - 1, 5))
    tokyo = ZoneInfo(settings.default_merchant_time_zone)
    today = datetime.now(tokyo).date()

    def position_after(rows: int) -> Position | None:
        """Where the big merchant's list stands after ``rows`` rows (a cursor)."""
        found = conn.execute(
            sa.select(payments_table.c.created_at, payments_table.c.payment_id)
            .where(payments_table.c.merchant_id == "m00000")
            .order_by(payments_table.c.created_at.desc(), payments_table.c.payment_id.desc())
            .offset(rows - 1)
            .limit(1)
        ).first()
        return None if found is None else Position(found[0], found[1])

    position, deep_position = position_after(500), position_after(50_000)

    def page(merchant: str, after: Position | None, **filters: Any) -> Callable[[], object]:
        where = repository.merchant_payments_where(merchant, **filters)
        return lambda: repository.payments_page(
            conn, where, after_position=after, limit=PAGE_SIZE + 1
        )

    return [
        ("list, first page, big merchant", page("m00000", None)),
        ("list, 11th page (cursor), big merchant", page("m00000", position)),
        (
            "list, 1,001st page (cursor), big merchant (not measured)",
            page("m00000", deep_position),
        ),
        (f"list, first page, tail merchant {tail}", page(tail, None)),
        (
            "list, status=refunded filter, big merchant (not measured)",
            page("m00000", None, status="refunded"),
        ),
        (
            "summary, 30 days by day, big merchant",
            lambda: totals(
                conn,
                "m00000",
                granularity="day",
                first=today - timedelta(days=29),
                last=today,
            ),
        ),
        (
            "summary, 7 days by hour, big merchant",
            lambda: totals(
                conn,
                "m00000",
                granularity="hour",
                first=datetime.combine(today - timedelta(days=6), datetime.min.time()),
                last=datetime.combine(today, datetime.min.time()) + timedelta(hours=23),
            ),
        ),
    ]


def _explained(
    conn: sa.Connection, analyze: str, name: str, statement: str, parameters: Any
) -> dict[str, Any]:
    """One statement's plan, and its time alone through the driver (the best of three, warm):
    the database's share of a request."""
    timings = []
    for _ in range(3):
        began = time.perf_counter()
        conn.exec_driver_sql(statement, parameters).all()
        timings.append(time.perf_counter() - began)
    result = conn.exec_driver_sql(f"{analyze} {statement}", parameters)
    columns = list(result.keys())
    plan = [dict(zip(columns, row, strict=True)) for row in result]
    for step in plan:
        for k, v in list(step.items()):
            if not isinstance(v, str | int | float | type(None)):
                step[k] = str(v)
    return {
        "query": name,
        "sql": " ".join(statement.split()),
        "plan": plan,
        "statement_ms": round(min(timings) * 1000, 2),
    }
