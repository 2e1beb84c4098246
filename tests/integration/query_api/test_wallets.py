"""A user's wallet over HTTP: ``GET /v1/users/{user_id}/balance`` and ``.../statement``.

Every test runs on SQLite and on MySQL/MariaDB. Wallet events reach the read database the way
the projector puts them there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import base64
import itertools
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from kessai.auth import ADMIN, USERS_READ, merchant_scope
from kessai.events import RewardGranted
from tests.helpers import api_key, bearer
from tests.integration.query_api.helpers import (
    T0,
    assert_error,
    page_through,
    query_settings,
    running,
)
from tests.integration.read_model import captured, project, write_offsets
from tests.wallet_streams import Step, taken_back, wallet_history

LONG_LIFE: list[Step] = [
    ("top_up", 50_000),
    *[("payment", 1_000), ("refund", 300), ("top_up", 200)] * 7,
    ("payment", 10),
]
"""23 movements: 50,000 in, then 1,000 out, 300 back and 200 in, seven times, then 10 out."""


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_balance_and_statement_need_users_read(read_db_url: str, tmp_path: Path) -> None:
    settings = query_settings(read_db_url, tmp_path)
    async with running(settings) as (_, client):
        users = bearer(api_key(settings, USERS_READ))
        others = [
            bearer(api_key(settings, merchant_scope("shop-1"))),
            bearer(api_key(settings, ADMIN)),
        ]
        for path in ("/v1/users/u1/balance", "/v1/users/u1/statement"):
            assert (await client.get(path, headers=users)).status_code == 200, path
            for key in others:
                denied = await client.get(path, headers=key)
                assert_error(denied, 403, "forbidden")
                assert denied.json()["error"]["details"] == {"scope": "users:read"}
            anonymous = await client.get(path, headers={"Authorization": ""})
            assert anonymous.status_code == 401


async def test_a_user_nothing_moved_money_for_has_an_empty_wallet(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    project(writer, wallet_history("u-someone", [("top_up", 700)]))
    response = await api.get("/v1/users/u-nobody/balance")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("user_id", "balance", "currency", "version")} == {
        "user_id": "u-nobody",
        "balance": 0,
        "currency": None,
        "version": 0,
    }
    statement = (await api.get("/v1/users/u-nobody/statement")).json()
    assert (statement["items"], statement["next_cursor"]) == ([], None)


async def test_the_balance_is_what_the_newest_movement_left_as_of_the_read_side(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    mine = wallet_history("u-1", [("top_up", 10_000), ("payment", 2_500), ("refund", 1_000)])
    theirs = wallet_history("u-2", [("top_up", 300)], currency="USD")
    project(writer, [*mine, *theirs, captured(at=T0, user_id="u-1")])
    write_offsets(writer, {0: (T0 + timedelta(hours=1), None)})
    response = await api.get("/v1/users/u-1/balance")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("user_id", "balance", "currency", "version")} == {
        "user_id": "u-1",
        "balance": 8_500,
        "currency": "JPY",
        "version": 3,
    }
    assert datetime.fromisoformat(body["as_of"]) == T0 + timedelta(hours=1)
    assert response.headers["X-Kessai-As-Of"]
    other = (await api.get("/v1/users/u-2/balance")).json()
    assert (other["balance"], other["currency"], other["version"]) == (300, "USD", 1)


async def test_the_statement_pages_newest_first_with_every_movement_once(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    history = wallet_history("u-long", LONG_LIFE, merchant_id="shop-a")
    project(writer, [*history, *wallet_history("u-short", [("top_up", 5)])])
    later = wallet_history("u-long", [*LONG_LIFE, ("top_up", 1), ("top_up", 2)])[len(LONG_LIFE) :]

    def more_arrive(page: int) -> None:
        if page == 1:  # newer movements projected while the user pages: never in this paging
            project(writer, later)

    items, pages = await page_through(
        api, "/v1/users/u-long/statement", limit=5, between=more_arrive
    )
    assert pages == 5
    assert [i["version"] for i in items] == list(range(23, 0, -1))
    by_version = {i["version"]: i for i in items}
    top_up, payment, refund = by_version[1], by_version[2], by_version[3]
    assert top_up == {
        "version": 1,
        "kind": "top_up",
        "amount": 50_000,
        "currency": "JPY",
        "balance_after": 50_000,
        "payment_id": None,
        "refund_id": None,
        "top_up_id": str(history[0].payload.top_up_id),
        "merchant_id": None,
        "source": "bank",
        "reference": "ref-1",
        "recorded_at": top_up["recorded_at"],
        "campaign_id": None,
    }
    assert datetime.fromisoformat(top_up["recorded_at"]) == history[0].recorded_at
    assert (payment["kind"], payment["amount"], payment["balance_after"]) == (
        "payment",
        -1_000,
        49_000,
    )
    assert payment["merchant_id"] == "shop-a"
    assert payment["payment_id"] == refund["payment_id"] == str(history[1].payload.payment_id)
    assert (refund["kind"], refund["amount"], refund["balance_after"]) == ("refund", 300, 49_300)
    assert refund["refund_id"] == str(history[2].payload.refund_id)
    assert by_version[23]["balance_after"] == 50_000 - 7 * 500 - 10
    # Each line's balance is the one before plus its amount.
    oldest_first = items[::-1]
    for before, line in itertools.pairwise(oldest_first):
        assert line["balance_after"] == before["balance_after"] + line["amount"]
    first = (await api.get("/v1/users/u-long/statement", params={"limit": 2})).json()
    assert [i["version"] for i in first["items"]] == [25, 24]


async def test_a_cursor_the_api_did_not_issue_for_a_statement_is_400_invalid_cursor(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    project(writer, wallet_history("u-1", [("top_up", 100), ("top_up", 200), ("top_up", 300)]))
    project(writer, [captured(at=T0 + timedelta(seconds=i), user_id="u-1") for i in range(3)])
    statement = (await api.get("/v1/users/u-1/statement", params={"limit": 1})).json()
    payments = (await api.get("/v1/users/u-1/payments", params={"limit": 1})).json()
    statement_cursor, payments_cursor = statement["next_cursor"], payments["next_cursor"]
    assert statement_cursor
    assert payments_cursor
    bad: list[Any] = [
        "",
        "abc",
        "x" * 300,
        statement_cursor + "=",
        statement_cursor[:-2],
        payments_cursor,  # a list of payments' cursor
        b64(b"[1, 2]"),
        b64(b'[2,"statement",2]'),
        b64(b'[1,"statement",0]'),
        b64(b'[1,"statement",-1]'),
        b64(b'[1,"statement",2.0]'),
        b64(b'[1,"statement","2"]'),
        b64(b'[1,"payments",2]'),
        b64(b'[1,"statement",99999999999]'),
        b64(b'[1, "statement", 2]'),  # spaces: not the spelling the API writes
    ]
    for token in bad:
        response = await api.get("/v1/users/u-1/statement", params={"cursor": token})
        assert_error(response, 400, "invalid_cursor")
    refused = await api.get("/v1/users/u-1/payments", params={"cursor": statement_cursor})
    assert_error(refused, 400, "invalid_cursor")
    # The API's own spelling of a position is accepted.
    following = await api.get(
        "/v1/users/u-1/statement", params={"cursor": b64(b'[1,"statement",2]')}
    )
    assert [i["version"] for i in following.json()["items"]] == [1]


async def test_the_statement_shows_a_cashback_and_its_take_back_with_their_campaign(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    history = wallet_history("u-back", [("top_up", 100), ("payment", 100), ("cashback", 60)])
    cashback = history[2]
    assert isinstance(cashback, RewardGranted)
    back = taken_back(cashback, 45, owed=15, balance_after=15, version=4)
    project(writer, [*history, back])
    items = (await api.get("/v1/users/u-back/statement")).json()["items"]
    line, grant = items[0], items[1]
    assert (grant["kind"], grant["amount"], grant["campaign_id"]) == ("reward", 60, "camp-1")
    assert {k: line[k] for k in ("kind", "amount", "balance_after", "campaign_id")} == {
        "kind": "reward_takeback",
        "amount": -45,
        "balance_after": 15,
        "campaign_id": "camp-1",
    }
    assert line["payment_id"] == grant["payment_id"] == str(cashback.payload.payment_id)
    assert line["refund_id"] == str(back.payload.refund_id)
