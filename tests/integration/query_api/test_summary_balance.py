"""The query API over HTTP: a merchant's balance in its summary (what kessai owes it, the ledger
account ``merchant:<id>``), over all time whatever the range, and of the same moment as the
totals beside it.

Every test runs on SQLite and on MySQL/MariaDB. Data reaches the read database the way the
projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.ledger import PaymentState, apply, postings_of
from kessai.postings import merchant_account
from tests.integration.query_api.helpers import TOKYO, query_settings, running
from tests.integration.read_model import Event, captured, project, refunded

SHOP = "/v1/merchants/shop-a/summary"


def at(day: int, hour: int = 3) -> datetime:
    """``hour`` o'clock UTC on 2026-11-``day`` (noon in Tokyo at 03:00 UTC)."""
    return datetime(2026, 11, day, hour, tzinfo=UTC)


def balance_of(body: dict[str, Any]) -> dict[str, int]:
    """The answer's balance as ``{currency: amount}``, after checking its shape and order."""
    entries = body["balance"]
    assert all(set(e) == {"currency", "amount"} for e in entries), entries
    assert [e["currency"] for e in entries] == sorted(e["currency"] for e in entries)
    return {e["currency"]: e["amount"] for e in entries}


def ledger_balance(events: Sequence[Event], merchant_id: str) -> dict[str, int]:
    """The balance of ``merchant:<merchant_id>`` summed from the events' postings, as the write
    side's ledger has it (a refund's postings from its payment's state before it)."""
    account = merchant_account(merchant_id)
    states: dict[Any, PaymentState] = {}
    found: dict[str, int] = defaultdict(int)
    for e in sorted(events, key=lambda e: (e.payment_id, e.version)):
        for posting in postings_of(e, states.get(e.payment_id)):
            if posting.account == account:
                found[e.payload.currency] += posting.amount
        states[e.payment_id] = apply(states.get(e.payment_id), e)
    return dict(found)


async def test_the_balance_is_every_payment_minus_every_refund_whatever_the_range(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    card = captured(at=at(20), merchant_id="shop-a", amount=5000)
    wallet = captured(at=at(20), merchant_id="shop-a", user_id="u-1", amount=1200, method="balance")
    dollars = captured(at=at(21), merchant_id="shop-a", amount=2500, currency="USD")
    later = captured(at=at(24), merchant_id="shop-a", user_id="u-2", amount=800, method="balance")
    gone = captured(at=at(21), merchant_id="shop-0", amount=300, currency="EUR")
    b_card = captured(at=at(20), merchant_id="shop-b", amount=99_999)
    b_wallet = captured(at=at(24), merchant_id="shop-b", amount=7, currency="USD", method="balance")
    refunds = [
        refunded(card, at=at(22), amount=1500),  # a partial refund two days after its payment
        refunded(wallet, at=at(23), amount=1200),  # a balance payment refunded in full, later
        refunded(card, at=at(24), amount=500, version=3, refunded_total=2000),
        refunded(dollars, at=at(24), amount=499),
        refunded(gone, at=at(22), amount=300),
    ]
    # Batches as the days go by: each day's events projected after the day before's.
    events: list[Event] = [card, wallet, dollars, later, gone, b_card, b_wallet, *refunds]
    for day in range(20, 25):
        project(writer, [e for e in events if e.occurred_at.day == day])

    # 2026-11-24 only: the range's totals are that day's, the balance is everything's.
    body = (await api.get(SHOP, params={"from": "2026-11-24", "to": "2026-11-24"})).json()
    jpy, usd = body["currencies"]
    assert (jpy["payments_amount"], jpy["refunds_amount"], jpy["net_amount"]) == (800, 500, 300)
    assert (usd["payments_amount"], usd["refunds_amount"], usd["net_amount"]) == (0, 499, -499)
    # JPY: 5000 + 1200 + 800 captured, 1500 + 1200 + 500 refunded; USD: 2500 - 499.
    assert balance_of(body) == {"JPY": 3800, "USD": 2001}
    assert balance_of(body) == ledger_balance(events, "shop-a")

    # Every other range, hours included, a range with nothing in it, and today: the same balance.
    for params in (
        {"from": "2026-11-20", "to": "2026-11-24"},
        {"from": "2026-11-22", "to": "2026-11-22", "granularity": "hour"},
        {"from": "2026-10-01", "to": "2026-10-31"},
        {},
    ):
        body = (await api.get(SHOP, params=params)).json()
        assert balance_of(body) == {"JPY": 3800, "USD": 2001}, params
    assert body["currencies"] == []  # nothing happened today, yet kessai owes the merchant

    # The whole range's net is the balance: the same money, counted by day.
    body = (await api.get(SHOP, params={"from": "2026-11-20", "to": "2026-11-24"})).json()
    assert {c["currency"]: c["net_amount"] for c in body["currencies"]} == balance_of(body)

    # Another merchant's payments are its own; a payment refunded in full leaves 0 owed.
    b = (await api.get("/v1/merchants/shop-b/summary")).json()
    assert balance_of(b) == {"JPY": 99_999, "USD": 7} == ledger_balance(events, "shop-b")
    assert balance_of((await api.get("/v1/merchants/shop-0/summary")).json()) == {"EUR": 0}

    # A merchant with nothing: an empty balance, not an error.
    response = await api.get("/v1/merchants/shop-nobody/summary")
    assert response.status_code == 200, response.text
    assert response.json()["currencies"] == []
    assert response.json()["balance"] == []


@contextlib.contextmanager
def writes_after_the_first_totals_read(
    engine: Engine, write: Callable[[], None]
) -> Iterator[list[str]]:
    """Runs ``write`` (in another connection, committed) right after the first statement that
    reads ``merchant_daily_totals`` through ``engine``, while that request is still reading.
    Yields the statements seen, for the test to check where the write fell."""
    seen: list[str] = []

    def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "merchant_daily_totals" not in statement:
            return
        seen.append(statement)
        if len(seen) == 1:
            write()

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", after)


async def test_the_balance_and_the_totals_of_one_answer_are_of_one_moment(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    now = utcnow()
    project(writer, [captured(at=now, merchant_id="shop-a", amount=1000)])
    today = now.astimezone(TOKYO).date().isoformat()
    params = {"from": today, "to": today}

    def a_payment_lands() -> None:
        project(writer, [captured(at=now, merchant_id="shop-a", amount=5)])

    async with running(query_settings(read_db_url, tmp_path)) as (app, client):
        with writes_after_the_first_totals_read(app.state.read_engine, a_payment_lands) as seen:
            body = (await client.get(SHOP, params=params)).json()
        # The payment landed between the range's totals and the balance, both read by then...
        assert len(seen) == 2, seen
        # ...and neither counts it: one snapshot, not a balance ahead of the totals beside it.
        assert body["currencies"][0]["payments_amount"] == 1000
        assert balance_of(body) == {"JPY": 1000}
        # The next answer sees it in both.
        body = (await client.get(SHOP, params=params)).json()
        assert body["currencies"][0]["payments_amount"] == 1005
        assert balance_of(body) == {"JPY": 1005}
