"""Campaigns over HTTP: ``GET /v1/admin/campaigns`` and ``.../{campaign_id}`` (scope ``admin``),
and each grant's campaign in a user's statement.

Every test runs on SQLite and on MySQL/MariaDB. Campaign events and grants reach the read
database the way the projector puts them there (``tests/integration/read_model.py``); times are
relative to the real clock, since the answer's status and last hour are as of now.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from kessai.auth import ADMIN, USERS_READ, merchant_scope
from kessai.campaigns import decide_stop, fold_campaign
from kessai.clock import utcnow
from kessai.grants import decide_exhausted
from tests.helpers import api_key, bearer
from tests.integration.query_api.helpers import assert_error, query_settings, running
from tests.integration.read_model import project, write_offsets
from tests.wallet_streams import AnyEvent, created, granted, wallet_history

DAY = timedelta(days=1)


def bonuses(campaign_id: str, amounts: list[int], at: datetime, first: int = 0) -> list[AnyEvent]:
    """A welcome bonus of each amount to a user of its own (its wallet's first movement)."""
    return [
        granted(f"{campaign_id}-u{first + i}", amount, balance_after=amount, version=1, at=at,
                campaign_id=campaign_id)
        for i, amount in enumerate(amounts)
    ]  # fmt: skip


async def get(api: httpx.AsyncClient, campaign_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/admin/campaigns/{campaign_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_campaigns_need_the_admin_scope(read_db_url: str, tmp_path: Path) -> None:
    settings = query_settings(read_db_url, tmp_path)
    async with running(settings) as (_, client):
        admin = bearer(api_key(settings, ADMIN))
        others = [
            bearer(api_key(settings, USERS_READ)),
            bearer(api_key(settings, merchant_scope("shop-1"))),
        ]
        for path in ("/v1/admin/campaigns", "/v1/admin/campaigns/c1"):
            answer = await client.get(path, headers=admin)
            assert answer.status_code in (200, 404), path
            for key in others:
                denied = await client.get(path, headers=key)
                assert_error(denied, 403, "forbidden")
                assert denied.json()["error"]["details"] == {"scope": "admin"}
            assert (await client.get(path, headers={"Authorization": ""})).status_code == 401


async def test_an_active_campaign_shows_its_budget_grants_last_hour_and_projection(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    now = utcnow()
    creation = created("cb", budget=100_000, starts_at=now - DAY, ends_at=now + 30 * DAY,
                       at=now - 2 * DAY)  # fmt: skip
    early = bonuses("cb", [1_000, 2_000], now - timedelta(hours=3))
    recent = bonuses("cb", [500, 700, 800], now - timedelta(minutes=20), first=2)
    project(writer, [creation, *early, *recent, *bonuses("other", [9_999], now)])
    write_offsets(writer, {0: (now - timedelta(seconds=5), None)})
    before = utcnow()
    body = await get(api, "cb")
    after = utcnow()
    assert {k: body[k] for k in ("campaign_id", "name", "kind", "currency", "status")} == {
        "campaign_id": "cb",
        "name": "Campaign cb",
        "kind": "cashback",
        "currency": "JPY",
        "status": "active",
    }
    assert body["rules"] == {
        "rate_bp": 2000,
        "cap_per_payment": 1_000,
        "cap_per_user_month": 10_000,
        "min_payment_amount": 0,
        "methods": ["balance", "card"],
        "merchants": None,
    }
    assert (body["budget"], body["granted"], body["remaining"], body["grants_count"]) == (
        100_000,
        5_000,
        95_000,
        5,
    )
    assert (body["granted_last_hour"], body["grants_last_hour"]) == (2_000, 3)
    since = datetime.fromisoformat(body["last_hour_since"])
    assert before - timedelta(minutes=61) <= since <= after - timedelta(hours=1)
    assert since.second == since.microsecond == 0
    # 95,000 left at 2,000 per 60-61 minutes: 47.5 hours from now, give or take the minute.
    projected = datetime.fromisoformat(body["projected_exhaustion_at"])
    assert before + timedelta(hours=47.5) <= projected <= after + timedelta(hours=47.5 * 61 / 60)
    assert datetime.fromisoformat(body["ends_at"]) == now + 30 * DAY
    assert (body["version"], body["stopped_at"], body["exhausted_at"]) == (1, None, None)
    assert datetime.fromisoformat(body["as_of"]) == now - timedelta(seconds=5)


async def test_each_status_as_of_now_and_no_projection_unless_active_and_running_out(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    now = utcnow()
    window = {"starts_at": now - DAY, "ends_at": now + DAY, "at": now - 2 * DAY}
    scheduled = created("s", starts_at=now + DAY, ends_at=now + 2 * DAY, at=now - DAY)
    ended = created("e", starts_at=now - 2 * DAY, ends_at=now - DAY, at=now - 3 * DAY)
    stopped = created("st", **window)  # type: ignore[arg-type]
    stop = decide_stop(fold_campaign([stopped]), now=now - timedelta(hours=2), actor="admin-1")
    exhausted = created("x", budget=3_000, **window)  # type: ignore[arg-type]
    exhaustion = decide_exhausted(
        fold_campaign([exhausted]), granted=3_000, now=now - timedelta(minutes=5), actor="r"
    )
    assert exhaustion is not None
    quiet = created("q", **window)  # type: ignore[arg-type]
    lasting = created("l", budget=1_000_000, **window)  # type: ignore[arg-type]
    recently = now - timedelta(minutes=10)
    project(
        writer,
        [
            scheduled, ended, stopped, stop, exhausted, exhaustion, quiet, lasting,
            *bonuses("x", [1_000, 2_000], recently),
            *bonuses("q", [500], now - timedelta(hours=2)),
            *bonuses("l", [100], recently),  # a million at 100 an hour: beyond its end
            *bonuses("e", [700], recently),  # a late grant still counts in its figures
        ],
    )  # fmt: skip
    statuses = {c: (await get(api, c))["status"] for c in ("s", "e", "st", "x", "q", "l")}
    assert statuses == {
        "s": "scheduled",
        "e": "ended",
        "st": "stopped",
        "x": "exhausted",
        "q": "active",
        "l": "active",
    }
    x = await get(api, "x")
    assert (x["granted"], x["remaining"], x["granted_last_hour"]) == (3_000, 0, 3_000)
    assert datetime.fromisoformat(x["exhausted_at"]) == now - timedelta(minutes=5)
    assert x["version"] == 2
    st = await get(api, "st")
    assert datetime.fromisoformat(st["stopped_at"]) == now - timedelta(hours=2)
    e = await get(api, "e")
    assert (e["granted"], e["grants_count"], e["granted_last_hour"]) == (700, 1, 700)
    q = await get(api, "q")
    assert (q["granted"], q["granted_last_hour"], q["grants_last_hour"]) == (500, 0, 0)
    for campaign_id in ("s", "e", "st", "x", "q", "l"):
        assert (await get(api, campaign_id))["projected_exhaustion_at"] is None, campaign_id


async def test_an_unknown_campaign_is_404_and_a_malformed_id_422(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    project(writer, [created("known")])
    error = assert_error(await api.get("/v1/admin/campaigns/unknown"), 404, "campaign_not_found")
    assert error["details"] == {"campaign_id": "unknown"}
    # Grants of a campaign whose creation is not projected yet do not make it known.
    project(writer, bonuses("not-yet", [500], utcnow()))
    assert_error(await api.get("/v1/admin/campaigns/not-yet"), 404, "campaign_not_found")
    for bad in ("a%20b", "x" * 65, "%C3%A9"):
        assert (await api.get(f"/v1/admin/campaigns/{bad}")).status_code == 422, bad
    assert (await api.get("/v1/admin/campaigns", params={"after": "a b"})).status_code == 422


async def test_the_list_pages_by_id_and_shows_each_campaign_as_its_own_route_does(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    now = utcnow()
    ids = ["c-05", "c-01", "c-04", "c-02", "c-03"]
    project(writer, [created(c, starts_at=now - DAY, ends_at=now + DAY) for c in ids])
    project(writer, bonuses("c-02", [300, 400], now - timedelta(minutes=1)))
    items: list[dict[str, Any]] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        response = await api.get("/v1/admin/campaigns", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        items += body["items"]
        after = body["next_after"]
        if after is None:
            break
    assert pages == 3
    assert [i["campaign_id"] for i in items] == sorted(ids)
    volatile = ("last_hour_since", "projected_exhaustion_at", "as_of", "lag_seconds")
    for item in items:
        alone = await get(api, item["campaign_id"])
        assert {k: v for k, v in item.items() if k not in volatile} == {
            k: v for k, v in alone.items() if k not in volatile
        }
    assert (items[1]["granted"], items[1]["grants_count"]) == (700, 2)
    empty = (await api.get("/v1/admin/campaigns", params={"after": "c-05"})).json()
    assert (empty["items"], empty["next_after"]) == ([], None)


async def test_the_statement_names_the_campaign_of_each_grant(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    history = wallet_history(
        "u-1",
        [("bonus", 500), ("top_up", 1_000), ("payment", 1_200), ("cashback", 240)],
        campaign_id="spring",
    )
    project(writer, history)
    items = (await api.get("/v1/users/u-1/statement")).json()["items"]
    lines = [(i["version"], i["kind"], i["amount"], i["campaign_id"]) for i in items]
    assert lines == [
        (4, "reward", 240, "spring"),
        (3, "payment", -1_200, None),
        (2, "top_up", 1_000, None),
        (1, "reward", 500, "spring"),
    ]
    cashback, bonus = items[0], items[3]
    assert cashback["payment_id"] == items[1]["payment_id"]
    assert bonus["payment_id"] is None
    assert cashback["balance_after"] == 500 + 1_000 - 1_200 + 240
