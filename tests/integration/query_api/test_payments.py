"""The query API over HTTP: one payment, a merchant's list and a user's history, paged by
keyset.

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.events import PaymentCaptured
from query_service import repository as query_repository
from query_service.cursor import Position, encode_cursor
from tests.integration.query_api.helpers import (
    T0,
    TOKYO,
    assert_error,
    ids_of,
    newest_first,
    page_through,
    read_db_writer,
    sort_key,
)
from tests.integration.read_model import (
    captured,
    insert_payment_rows,
    payment_row,
    project,
    refunded,
)

# -- a payment -------------------------------------------------------------------------------


async def test_payment_detail_has_every_column_and_its_refunds(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    payment = captured(
        at=T0,
        merchant_id="shop-a",
        user_id="user-7",
        amount=5000,
        method="balance",
        store_id="store-9",
        order_ref="order-1",
        metadata={"campaign": "tv", "note": "x"},
    )
    first = refunded(payment, at=T0 + timedelta(days=1), amount=1200, reason="damaged")
    second = refunded(
        payment, at=T0 + timedelta(days=2), amount=300, version=3, refunded_total=1500
    )
    untouched = captured(at=T0, merchant_id="shop-a")
    project(writer, [payment, untouched, first])
    project(writer, [second])  # a later batch, as it would arrive

    response = await api.get(f"/v1/payments/{payment.payment_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.pop("as_of") is None
    assert body.pop("lag_seconds") is None
    assert body == {
        "payment_id": str(payment.payment_id),
        "merchant_id": "shop-a",
        "user_id": "user-7",
        "store_id": "store-9",
        "order_ref": "order-1",
        "method": "balance",
        "currency": "JPY",
        "captured_amount": 5000,
        "refunded_amount": 1500,
        "status": "partially_refunded",
        "version": 3,
        "metadata": {"campaign": "tv", "note": "x"},
        "created_at": T0.isoformat(),
        "updated_at": (T0 + timedelta(days=2)).isoformat(),
        "refunds": [
            {
                "refund_id": str(r.payload.refund_id),
                "payment_id": str(payment.payment_id),
                "merchant_id": "shop-a",
                "version": r.version,
                "amount": r.payload.amount,
                "currency": "JPY",
                "reason": r.payload.reason,
                "created_at": r.occurred_at.isoformat(),
            }
            for r in (first, second)
        ],
    }

    response = await api.get(f"/v1/payments/{untouched.payment_id}")
    assert response.json()["refunds"] == []
    assert response.json()["status"] == "captured"

    missing = uuid.uuid4()
    error = assert_error(await api.get(f"/v1/payments/{missing}"), 404, "payment_not_found")
    assert error["details"] == {"payment_id": str(missing)}
    assert_error(await api.get("/v1/payments/not-a-uuid"), 422, "validation_error")


# -- a merchant's list -----------------------------------------------------------------------


async def test_merchant_list_is_newest_first_and_every_filter_narrows_it(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    def at_tokyo(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
        return datetime(2026, 11, day, hour, minute, second, tzinfo=TOKYO)

    # (time, user, store, method, amount, refund): refund "part" or "all" or None.
    specs = [
        (at_tokyo(19, 23, 59, 59), "user-1", "store-x", "card", 100, None),
        (at_tokyo(20, 0, 0, 0), "user-1", "store-x", "card", 500, None),  # first instant of 11-20
        (at_tokyo(20, 9), "user-2", "store-y", "balance", 1500, "part"),
        (at_tokyo(20, 9), "user-3", "store-y", "card", 2000, None),  # same instant: id decides
        (at_tokyo(20, 23, 59, 59), "user-2", None, "balance", 2001, "all"),
        (at_tokyo(21, 0, 0, 0), "user-1", "store-x", "card", 499, None),  # first of 11-21
        (at_tokyo(21, 12), "user-3", "store-x", "balance", 10_000, "part"),
        (at_tokyo(22, 8), "user-2", "store-y", "card", 750, None),
    ]
    events: list[Any] = []
    rows: list[dict[str, Any]] = []
    for at, user, store, method, amount, refund in specs:
        payment = captured(
            at=at.astimezone(UTC),
            merchant_id="shop-a",
            user_id=user,
            store_id=store,
            method=method,
            amount=amount,
        )
        events.append(payment)
        status = "captured"
        if refund is not None:
            part = amount if refund == "all" else 1
            events.append(
                refunded(payment, at=payment.occurred_at + timedelta(hours=1), amount=part)
            )
            status = "refunded" if refund == "all" else "partially_refunded"
        rows.append(
            {
                "event": payment,
                "user_id": user,
                "store_id": store,
                "method": method,
                "amount": amount,
                "status": status,
            }
        )
    # Another merchant with the same users and stores: never part of shop-a's answers.
    events.extend(
        captured(at=at_tokyo(20, 10), merchant_id="shop-b", user_id=u, store_id="store-x")
        for u in ("user-1", "user-2")
    )
    project(writer, events)

    def expect(keep: Any) -> list[str]:
        return newest_first([r["event"] for r in rows if keep(r)])

    def created(r: dict[str, Any]) -> datetime:
        at: datetime = r["event"].occurred_at
        return at

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, expect(lambda r: True)),
        ({"status": "captured"}, expect(lambda r: r["status"] == "captured")),
        ({"status": "partially_refunded"}, expect(lambda r: r["status"] == "partially_refunded")),
        ({"status": "refunded"}, expect(lambda r: r["status"] == "refunded")),
        ({"method": "balance"}, expect(lambda r: r["method"] == "balance")),
        ({"user_id": "user-2"}, expect(lambda r: r["user_id"] == "user-2")),
        ({"store_id": "store-x"}, expect(lambda r: r["store_id"] == "store-x")),
        ({"min_amount": 500}, expect(lambda r: r["amount"] >= 500)),
        ({"max_amount": 2000}, expect(lambda r: r["amount"] <= 2000)),
        ({"min_amount": 500, "max_amount": 2000}, expect(lambda r: 500 <= r["amount"] <= 2000)),
        # Dates are whole days in the merchant's zone (Tokyo): `to` includes its whole day.
        (
            {"from": "2026-11-20", "to": "2026-11-20"},
            expect(lambda r: at_tokyo(20, 0) <= created(r) < at_tokyo(21, 0)),
        ),
        ({"from": "2026-11-21"}, expect(lambda r: created(r) >= at_tokyo(21, 0))),
        ({"to": "2026-11-19"}, expect(lambda r: created(r) < at_tokyo(20, 0))),
        # Datetimes are instants: `from` inclusive, `to` exclusive.
        (
            {"from": "2026-11-20T00:00:00+09:00", "to": "2026-11-21T00:00:00Z"},
            expect(lambda r: at_tokyo(20, 0) <= created(r) < datetime(2026, 11, 21, tzinfo=UTC)),
        ),
        (
            {"from": "2026-11-20T00:00:00Z", "to": "2026-11-21T00:00:00+09:00"},
            expect(lambda r: datetime(2026, 11, 20, tzinfo=UTC) <= created(r) < at_tokyo(21, 0)),
        ),
        (
            {"status": "captured", "method": "card", "min_amount": 500, "from": "2026-11-20"},
            expect(
                lambda r: (
                    r["status"] == "captured"
                    and r["method"] == "card"
                    and r["amount"] >= 500
                    and created(r) >= at_tokyo(20, 0)
                )
            ),
        ),
    ]
    for params, expected in cases:
        response = await api.get("/v1/merchants/shop-a/payments", params={**params, "limit": 500})
        assert response.status_code == 200, (params, response.text)
        body = response.json()
        assert ids_of(body) == expected, params
        assert body["next_cursor"] is None
        assert {item["merchant_id"] for item in body["items"]} <= {"shop-a"}
    assert len(cases[0][1]) == len(specs)

    body = (await api.get("/v1/merchants/shop-nobody/payments")).json()
    assert body["items"] == []
    assert body["next_cursor"] is None


async def test_paging_1000_payments_returns_each_once_in_order(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    events = [
        # Three payments share each instant, so the payment id must break ties.
        captured(at=base + timedelta(seconds=i // 3), merchant_id=merchant)
        for i in range(500)
        for merchant in ("shop-a", "shop-b")
    ]
    for start in range(0, len(events), 250):
        project(writer, events[start : start + 250])

    for merchant in ("shop-a", "shop-b"):
        items, pages = await page_through(api, f"/v1/merchants/{merchant}/payments", limit=37)
        expected = newest_first([e for e in events if e.merchant_id == merchant])
        assert [i["payment_id"] for i in items] == expected
        assert len(set(expected)) == 500
        assert pages == 14  # ceil(500 / 37): no trailing empty page
        assert {i["merchant_id"] for i in items} == {merchant}


async def test_paging_10000_payments_while_more_are_projected_skips_and_repeats_none(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    existing = [
        captured(at=base + timedelta(seconds=10 * (i // 2)), merchant_id="shop-a")
        for i in range(10_000)
    ]
    for start in range(0, len(existing), 2_000):
        project(writer, existing[start : start + 2_000])
    arrived: list[PaymentCaptured] = []

    def project_more(page: int) -> None:
        late = [
            captured(at=utcnow(), merchant_id="shop-a"),  # newer than all: before the cursor
            captured(at=base + timedelta(seconds=3 * page), merchant_id="shop-a"),
            captured(at=base + timedelta(seconds=50_000 - 2_000 * page), merchant_id="shop-a"),
            captured(at=base - timedelta(days=1), merchant_id="shop-a"),  # older than all
        ]
        arrived.extend(late)
        project(writer, late)

    items, pages = await page_through(
        api, "/v1/merchants/shop-a/payments", limit=500, between=project_more
    )
    assert pages >= 20
    seen = [i["payment_id"] for i in items]
    assert len(seen) == len(set(seen)), "a payment was returned twice"
    assert {str(e.payment_id) for e in existing} <= set(seen), "a payment was skipped"
    assert set(seen) <= {str(e.payment_id) for e in existing + arrived}
    keys = [sort_key(i) for i in items]
    assert keys == sorted(keys, reverse=True)
    assert len(set(keys)) == len(keys)
    assert arrived, "the data changed while paging"


async def test_a_cursor_the_api_did_not_issue_is_400_invalid_cursor(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    events = [captured(at=T0 + timedelta(seconds=i), merchant_id="shop-a") for i in range(3)]
    project(writer, events)
    good = (await api.get("/v1/merchants/shop-a/payments", params={"limit": 1})).json()
    cursor = good["next_cursor"]
    assert cursor

    def b64(raw: bytes) -> str:
        import base64

        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payment_hex = events[0].payment_id.hex
    bad = [
        "",
        "abc",
        "!!!!",
        "x" * 300,
        cursor + "=",  # padding this API never writes
        cursor[:-2],  # truncated
        cursor + "AA",
        b64(b"not json"),
        b64(b"{}"),
        b64(b"[1, 2]"),
        b64(f'[2, 1, "{payment_hex}"]'.encode()),  # unknown version
        b64(f'[1, -5, "{payment_hex}"]'.encode()),
        b64(f'[1, 1.5, "{payment_hex}"]'.encode()),
        b64(f'[1, 99999999999999999999999, "{payment_hex}"]'.encode()),
        b64(f'[1, 1, "{payment_hex.upper()}"]'.encode()),
        b64(b'[1, 1, "not-a-uuid"]'),
        b64(f'[true, 1, "{payment_hex}"]'.encode()),
        b64(f'[1,1,"{payment_hex}",0]'.encode()),
        b64(f'[1, 1, "{payment_hex}"]'.encode()),  # spaces: not the spelling the API writes
    ]
    for token in bad:
        for path in ("/v1/merchants/shop-a/payments", "/v1/users/user-1/payments"):
            response = await api.get(path, params={"cursor": token})
            assert_error(response, 400, "invalid_cursor")

    # The same position, spelled as the API spells it, is accepted.
    payment = events[1]
    token = encode_cursor_for(payment)
    response = await api.get("/v1/merchants/shop-a/payments", params={"cursor": token})
    assert ids_of(response.json()) == [str(events[0].payment_id)]


def encode_cursor_for(payment: PaymentCaptured) -> str:
    from query_service.cursor import Position

    return encode_cursor(Position(payment.occurred_at, payment.payment_id))


# -- a user's history ------------------------------------------------------------------------


async def test_user_history_spans_merchants_and_holds_only_that_user(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    mine = [
        captured(at=base + timedelta(minutes=i // 2), merchant_id=f"shop-{i % 3}", user_id="u-42")
        for i in range(30)
    ]
    others = [
        captured(at=base + timedelta(minutes=i), merchant_id="shop-0", user_id=f"u-{i}")
        for i in range(10)
    ]
    project(writer, mine + others)
    items, pages = await page_through(api, "/v1/users/u-42/payments", limit=7)
    assert [i["payment_id"] for i in items] == newest_first(mine)
    assert pages == 5
    assert {i["merchant_id"] for i in items} == {"shop-0", "shop-1", "shop-2"}
    body = (await api.get("/v1/users/u-nobody/payments")).json()
    assert body["items"] == []
    assert body["next_cursor"] is None


def test_mysql_a_page_after_a_cursor_reads_from_the_cursor_not_from_the_newest_row(
    mysql_read_db_url: str,
) -> None:
    """A deep page costs what the first page costs: the statement sent for it (captured as it
    runs) reads about one page of index entries (MariaDB's ANALYZE), not every newer row."""
    rows_total, depth = 30_000, 20_000
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        payment_row(created_at=base + timedelta(seconds=i), merchant_id="shop-big")
        for i in range(rows_total)
    ] + [
        payment_row(created_at=base + timedelta(seconds=i), merchant_id=f"shop-{i % 50}")
        for i in range(2 * rows_total)
    ]
    for engine in read_db_writer(mysql_read_db_url):
        insert_payment_rows(engine, rows)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE TABLE payments")
    engine = create_db_engine(mysql_read_db_url, pool_size=1)
    try:
        where = query_repository.merchant_payments_where(
            "shop-big", start=None, end=None, status=None, method=None, user_id=None,
            store_id=None, min_amount=None, max_amount=None,
        )  # fmt: skip
        with engine.connect() as conn:
            newest_first = query_repository.payments_page(
                conn, where, after_position=None, limit=depth + 1
            )
            cursor = Position(newest_first[-1].created_at, newest_first[-1].payment_id)
            sent: list[tuple[str, Any]] = []

            def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
                sent.append((statement, params))

            sa.event.listen(engine, "before_cursor_execute", capture)
            try:
                page = query_repository.payments_page(conn, where, after_position=cursor, limit=51)
            finally:
                sa.event.remove(engine, "before_cursor_execute", capture)
            ((statement, params),) = sent
            plan = orjson.loads(
                conn.exec_driver_sql(f"ANALYZE FORMAT=JSON {statement}", params).scalar_one()
            )
    finally:
        engine.dispose()
    assert [r.payment_id for r in page] == [
        r["payment_id"] for r in sorted(rows[:rows_total], key=lambda r: r["created_at"])
    ][rows_total - depth - 2 : rows_total - depth - 53 : -1]
    read = _r_rows(plan)
    assert 0 < read <= 60, f"a page {depth} rows deep read {read} rows"


def _r_rows(plan: Any) -> int:
    """Rows read from ``payments`` in an ``ANALYZE FORMAT=JSON`` plan (wherever it nests the
    table: under a sort or a limit node, say)."""
    if isinstance(plan, dict):
        table = plan.get("table")
        if isinstance(table, dict) and table.get("table_name") == "payments":
            return int(table["r_rows"])
        found = [_r_rows(v) for v in plan.values() if isinstance(v, dict | list)]
    elif isinstance(plan, list):
        found = [_r_rows(v) for v in plan]
    else:
        return -1
    return max(found, default=-1)
