"""The query API over HTTP: it cannot write, and its queries use their indexes (MySQL).

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.schema.read import payments
from tests.integration.query_api.helpers import (
    T0,
    StatementLog,
    assert_error,
    query_settings,
    read_db_writer,
    running,
)
from tests.integration.read_model import (
    captured,
    payment_row,
    project,
    server_execute,
)
from tests.wallet_streams import created, granted, wallet_history

# -- read only -------------------------------------------------------------------------------


async def test_the_query_engine_refuses_writes(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    project(writer, [captured(at=T0, merchant_id="shop-a")])
    row = payment_row(created_at=T0, merchant_id="shop-a")
    async with running(query_settings(read_db_url, tmp_path)) as (app, client):
        engine: Engine = app.state.read_engine
        writes = [
            payments.insert().values(**row),
            payments.update().values(captured_amount=1),
            payments.delete(),
        ]
        for statement in writes:
            with pytest.raises(sa.exc.DBAPIError) as refused, engine.begin() as conn:
                conn.execute(statement)
            if engine.dialect.name == "mysql":
                # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
                assert refused.value.orig is not None
                assert refused.value.orig.args[0] == 1792
        if engine.dialect.name == "sqlite":
            # Not only the pragma: the file itself is open read-only.
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA query_only=OFF")
                with pytest.raises(sa.exc.OperationalError, match="readonly"):
                    conn.execute(payments.delete())
                conn.invalidate()  # never hand a session without the pragma back to the pool
        response = await client.get("/v1/merchants/shop-a/payments")
        assert len(response.json()["items"]) == 1
    with writer.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(payments)).scalar_one() == 1


async def test_sqlite_missing_read_db_is_not_created_and_not_ready(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "read.db"
    async with running(query_settings(f"sqlite:///{missing}", tmp_path)) as (_, client):
        assert_error(await client.get("/readyz"), 503, "read_db_unavailable")
        assert_error(await client.get("/v1/merchants/shop-a/payments"), 503, "read_db_unavailable")
    assert not missing.exists()
    assert not missing.parent.exists()


async def test_mysql_select_only_user_reads_and_cannot_write(
    mysql_read_db_url: str, mysql_server: str, tmp_path: Path
) -> None:
    url = sa.make_url(mysql_read_db_url)
    user = f"kq_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    server_execute(
        mysql_server,
        f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
        f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'%'",
    )
    try:
        for engine in read_db_writer(mysql_read_db_url):
            project(engine, [captured(at=T0, merchant_id="shop-a")])
        select_only = url.set(username=user, password=password).render_as_string(
            hide_password=False
        )
        settings = query_settings(mysql_read_db_url, tmp_path, query_db_url=select_only)
        async with running(settings) as (app, client):
            response = await client.get("/v1/merchants/shop-a/payments")
            assert response.status_code == 200, response.text
            assert len(response.json()["items"]) == 1
            with app.state.read_engine.connect() as conn:
                # Even a session that asks for read-write is refused: the grant forbids it.
                conn.exec_driver_sql("SET SESSION TRANSACTION READ WRITE")
                with pytest.raises(sa.exc.DBAPIError) as refused:
                    conn.execute(payments.delete())
                conn.invalidate()  # never hand a read-write session back to the pool
            assert refused.value.orig is not None
            assert refused.value.orig.args[0] == 1142  # ER_TABLEACCESS_DENIED_ERROR
        plain = sa.create_engine(select_only)
        try:
            with pytest.raises(sa.exc.DBAPIError), plain.begin() as conn:
                conn.execute(
                    payments.insert().values(**payment_row(created_at=T0, merchant_id="x"))
                )
        finally:
            plain.dispose()
    finally:
        server_execute(mysql_server, f"DROP USER IF EXISTS '{user}'@'%'")


# -- the query plans (MySQL) -----------------------------------------------------------------


def _kind_of(statement: str) -> tuple[str, str] | None:
    """Which of the API's queries ``statement`` is, and the table it reads; ``None``: another."""
    if "FROM merchant_daily_totals" in statement and "GROUP BY" in statement:
        return "merchant balance", "merchant_daily_totals"
    if "FROM merchant_daily_totals" in statement:
        return "daily totals", "merchant_daily_totals"
    if "FROM merchant_hourly_totals" in statement:
        return "hourly totals", "merchant_hourly_totals"
    if "FROM payments" in statement and "payments.merchant_id =" in statement:
        return "merchant list", "payments"
    if "FROM payments" in statement and "payments.user_id =" in statement:
        return "user history", "payments"
    if "FROM wallets" in statement:
        return "balance", "wallets"
    if "FROM wallet_movements" in statement:
        return "statement", "wallet_movements"
    if "FROM campaigns" in statement:
        return "campaigns", "campaigns"
    if "FROM campaign_totals" in statement:
        return "campaign totals", "campaign_totals"
    if "FROM campaign_minute_totals" in statement:
        return "campaign last hour", "campaign_minute_totals"
    return None


async def test_mysql_queries_use_the_intended_indexes(
    mysql_read_db_url: str, tmp_path: Path
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    events = [
        captured(
            at=base + timedelta(minutes=17 * i),
            merchant_id=f"m-{i % 40:02d}",
            user_id=f"u-{i % 200:03d}",
            amount=100 + i % 1000,
            method="card" if i % 3 else "balance",
        )
        for i in range(4000)
    ]
    wallet_streams = [
        wallet_history(f"u-{i:03d}", [("top_up", 10_000), *[("payment", 10)] * 19])
        for i in range(50)
    ]
    # 300 campaigns, each with a grant; ten of them with a grant a minute over the last ten
    # hours.
    now = utcnow()
    campaigns = [created(f"c-{c:03d}") for c in range(300)]
    grants = [
        granted(f"g-{c}-{m}", 500, balance_after=500, version=1, at=now - timedelta(minutes=m),
                campaign_id=f"c-{c:03d}")
        for c in range(300)
        for m in range(600 if c < 10 else 1)
    ]  # fmt: skip
    for engine in read_db_writer(mysql_read_db_url):
        for start in range(0, len(events), 1000):
            project(engine, events[start : start + 1000])
        project(engine, [e for stream in wallet_streams for e in stream])
        project(engine, campaigns)
        for start in range(0, len(grants), 1000):
            project(engine, grants[start : start + 1000])
        with engine.connect() as conn:
            for table in (
                "payments",
                "merchant_daily_totals",
                "merchant_hourly_totals",
                "wallets",
                "wallet_movements",
                "campaigns",
                "campaign_totals",
                "campaign_minute_totals",
            ):
                conn.exec_driver_sql(f"ANALYZE TABLE {table}").all()

    async with running(query_settings(mysql_read_db_url, tmp_path)) as (app, client):
        log = StatementLog(app.state.read_engine)
        first = (await client.get("/v1/merchants/m-07/payments", params={"limit": 20})).json()
        requests: list[tuple[str, dict[str, Any]]] = [
            ("/v1/merchants/m-07/payments", {"limit": 20, "cursor": first["next_cursor"]}),
            (
                "/v1/merchants/m-07/payments",
                {
                    "status": "captured",
                    "method": "card",
                    "min_amount": 150,
                    "max_amount": 900,
                    "from": "2026-11-10",
                    "to": "2026-11-20",
                    "limit": 20,
                },
            ),
            ("/v1/merchants/m-07/payments.csv", {"from": "2026-11-10"}),
            ("/v1/users/u-042/payments", {"limit": 5}),
            ("/v1/merchants/m-07/summary", {"from": "2026-11-01", "to": "2026-11-30"}),
            (
                "/v1/merchants/m-07/summary",
                {"from": "2026-11-10", "to": "2026-11-12", "granularity": "hour"},
            ),
        ]
        for path, params in requests:
            response = await client.get(path, params=params)
            assert response.status_code == 200, response.text
        users = (await client.get("/v1/users/u-042/payments", params={"limit": 5})).json()
        await client.get(
            "/v1/users/u-042/payments", params={"limit": 5, "cursor": users["next_cursor"]}
        )
        assert (await client.get("/v1/users/u-042/balance")).json()["version"] == 20
        lines = (await client.get("/v1/users/u-042/statement", params={"limit": 5})).json()
        await client.get(
            "/v1/users/u-042/statement", params={"limit": 5, "cursor": lines["next_cursor"]}
        )
        assert (await client.get("/v1/admin/campaigns/c-003")).json()["grants_last_hour"] >= 60
        page = (await client.get("/v1/admin/campaigns", params={"limit": 3})).json()
        await client.get("/v1/admin/campaigns", params={"limit": 3, "after": page["next_after"]})
        log.close()

    def explain(statement: str, params: Any) -> list[dict[str, Any]]:
        url = sa.make_url(mysql_read_db_url)
        with (
            pymysql.connect(
                host=url.host,
                port=url.port or 3306,
                user=url.username,
                password=url.password or "",
                database=url.database,
            ) as conn,
            conn.cursor(pymysql.cursors.DictCursor) as cur,
        ):
            cur.execute("EXPLAIN " + statement, params)
            return list(cur.fetchall())

    expected_keys = {
        "merchant list": "ix_payments_merchant_id_created_at_payment_id",
        "user history": "ix_payments_user_id_created_at_payment_id",
        "daily totals": "PRIMARY",
        "hourly totals": "PRIMARY",
        "merchant balance": "PRIMARY",
        "balance": "PRIMARY",
        "statement": "PRIMARY",
        "campaigns": "PRIMARY",
        "campaign totals": "PRIMARY",
        "campaign last hour": "PRIMARY",
    }
    checked: dict[str, int] = dict.fromkeys(expected_keys, 0)
    # The merchant's balance sums its daily totals per currency: the scan is the merchant's
    # primary key prefix, and only the groups (one per currency) go through a temporary table
    # and a sort.
    grouped = {"merchant balance"}
    for statement, params in log.statements:
        found = _kind_of(statement)
        if found is None:
            continue
        kind, table = found
        plan = [row for row in explain(statement, params) if row["table"] == table]
        assert plan, (statement, explain(statement, params))
        for row in plan:
            assert row["type"] != "ALL", (kind, statement, row)
            assert row["key"] == expected_keys[kind], (kind, statement, row)
            if kind in grouped:
                assert row["type"] == "ref", (kind, statement, row)
            else:
                assert "filesort" not in (row["Extra"] or ""), (kind, statement, row)
        checked[kind] += 1
    # list: 3 pages + the export's count and chunk; history: 2 pages; one scan per summary and
    # one merchant balance per summary; one wallet balance; two statement pages.
    assert checked == {
        "merchant list": 5,
        "user history": 3,
        "daily totals": 1,
        "hourly totals": 1,
        "merchant balance": 2,
        "balance": 1,
        "statement": 2,
        "campaigns": 3,
        "campaign totals": 3,
        "campaign last hour": 3,
    }
