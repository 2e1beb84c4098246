"""``kessai loadgen`` against the real command API served over HTTP (uvicorn in a thread), on
SQLite and on MariaDB: what it reports is what the write store holds, the wallets it funded
and the payments they could not cover included."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE, Principal
from kessai.db import create_db_engine
from kessai.schema.write import events, idempotency_keys, wallet_events
from kessai.settings import Settings
from kessai_cli import loadgen
from kessai_cli.keys import DEV_KEYS
from kessai_cli.main import app as cli_app
from tests.helpers import UNLIMITED, api_key
from tests.integration.test_api_schemas import Server

REQUESTS = 800
PAYERS = 200
"""Payers of these tests' traffic (``loadgen.Mix.users``): few, so funding them is quick."""
FUNDS = 10_000_000
"""Each payer's top-up: far more than 800 payments of at most 50,000 among 200 payers spend."""


def _settings(write_db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        write_db_url=write_db_url,
        read_db_url=f"sqlite:///{tmp_path / 'read.db'}",
        rate_limit_per_ip=UNLIMITED,
        rate_limit_writes=UNLIMITED,
        rate_limit_reads=UNLIMITED,
        rate_limit_expensive=UNLIMITED,
        # Above FUNDS plus every top-up of the traffic: the limit is tested alone.
        wallet_max_balance=10**9,
    )


def _stored(url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """Events by type (payments' and wallets'), captured payments by merchant, idempotency
    records."""
    engine = create_db_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            by_type = dict(
                conn.execute(
                    sa.select(events.c.event_type, sa.func.count()).group_by(events.c.event_type)
                ).all()
            )
            by_type.update(
                conn.execute(
                    sa.select(wallet_events.c.event_type, sa.func.count()).group_by(
                        wallet_events.c.event_type
                    )
                ).all()
            )
            by_merchant = dict(
                conn.execute(
                    sa.select(events.c.merchant_id, sa.func.count())
                    .where(events.c.version == 1)
                    .group_by(events.c.merchant_id)
                ).all()
            )
            keys = conn.execute(
                sa.select(sa.func.count()).select_from(idempotency_keys)
            ).scalar_one()
    finally:
        engine.dispose()
    return by_type, by_merchant, keys


def test_loadgen_counts_match_the_write_store(write_db_url: str, tmp_path: Path) -> None:
    settings = _settings(write_db_url, tmp_path)
    key = api_key(settings, PAYMENTS_WRITE)
    wallets_key = api_key(settings, WALLETS_WRITE)
    mix = loadgen.Mix(merchants=50, users=PAYERS, top_up_share=0.03, seed=3)
    with Server(create_app(settings)) as server:
        funding = asyncio.run(
            loadgen.fund(server.url, wallets_key, loadgen.payers(mix), amount=FUNDS)
        )
        result = loadgen.run_sync(
            loadgen.Run(
                url=server.url,
                api_key=key,
                wallets_key=wallets_key,
                connections=16,
                requests=REQUESTS,
            ),
            mix,
        )

    # Every payer was funded first, one top-up each.
    assert (funding.users, funding.funded, funding.at_limit) == (PAYERS, PAYERS, 0), funding
    assert dict(funding.by_status) == {201: PAYERS}
    assert funding.complete
    # Every request answered, and accepted: no errors under this load, no wallet short.
    assert result.sent == REQUESTS
    assert result.connection_errors == 0
    assert len(result.latencies) == REQUESTS
    assert dict(result.by_status) == {201: REQUESTS}
    assert result.insufficient_balance == 0
    # The mix: refunds, top-ups and client retries are present, and retries were replayed.
    kinds = {kind: sum(c.values()) for kind, c in result.by_kind.items()}
    assert kinds["refund"] >= 5
    assert kinds["top_up"] >= 5
    assert kinds["retry"] >= 1
    assert result.replayed == kinds["retry"]
    assert result.payments + result.refunds + result.top_ups + result.replayed == REQUESTS

    by_type, by_merchant, keys = _stored(settings.resolved_write_db_url())
    # What the summary says was accepted is exactly what was recorded: replays added nothing.
    # Each balance payment debited its payer's wallet and each refund credited it back.
    assert by_type.get("PaymentCaptured", 0) == result.payments
    assert by_type.get("PaymentRefunded", 0) == result.refunds
    assert by_type.get("WalletDebited", 0) == result.payments
    assert by_type.get("WalletCredited", 0) == result.refunds
    assert by_type.get("TopUpReceived", 0) == funding.funded + result.top_ups
    assert keys == funding.funded + result.payments + result.refunds + result.top_ups
    assert by_merchant == dict(result.per_merchant)
    # Merchants shop-1 ... shop-50; the hot one, shop-1, has about its 30% share, far more
    # than any other.
    assert set(by_merchant) <= {f"shop-{n}" for n in range(1, 51)}
    hot = by_merchant["shop-1"] / result.payments
    assert 0.22 < hot < 0.38, hot
    second = sorted(by_merchant.values())[-2] / result.payments
    assert second < hot * 0.7
    assert result.percentile(0.5) <= result.percentile(0.99) <= max(result.latencies)


def test_loadgen_command_with_the_development_key(write_db_url: str, tmp_path: Path) -> None:
    """The CLI finds the keys in $KESSAI_HOME/dev-keys.json (as `kessai up` writes them: the
    payments key pays, the wallets key funds the payers first) and prints a summary, and pays
    merchants that the development dashboard key of `kessai up` reads, so the traffic shows
    there."""
    settings = _settings(write_db_url, tmp_path)
    dev_keys = {label: api_key(settings, *DEV_KEYS[label][1]) for label in ("payments", "wallets")}
    (tmp_path / "dev-keys.json").write_text(json.dumps(dev_keys))
    with Server(create_app(settings)) as server:
        outcome = CliRunner().invoke(
            cli_app,
            ["loadgen", "--url", server.url, "--requests", "100", "--connections", "4",
             "--rate", "400", "--users", "50", "--json", str(tmp_path / "summary.json")],
            env={"KESSAI_HOME": str(tmp_path)},
        )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "funded 50 of 50 wallets with 500,000 JPY each" in outcome.output
    assert "accepted" in outcome.output
    assert "insufficient balance (402)" in outcome.output
    assert "p99" in outcome.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["funding"]["users"] == summary["funding"]["funded"] == 50
    assert summary["sent"] == 100
    assert summary["by_status"] == {"201": 100}
    assert summary["insufficient_balance"] == 0
    by_type, by_merchant, _ = _stored(settings.resolved_write_db_url())
    assert by_type["TopUpReceived"] == 50 + summary["top_ups"]
    assert by_type["PaymentCaptured"] == summary["payments"] > 0
    _, dashboard_scopes = DEV_KEYS["merchant"]
    dashboard = Principal(key_id="dev", name="dashboard", scopes=frozenset(dashboard_scopes))
    assert dashboard.reads_merchant(max(by_merchant, key=by_merchant.__getitem__)), by_merchant
    shown = sum(n for m, n in by_merchant.items() if dashboard.reads_merchant(m))
    assert shown / sum(by_merchant.values()) > 0.2, by_merchant  # shop-1 30%, shop-2 ~9%


def test_loadgen_counts_the_payments_wallets_cannot_cover(
    write_db_url: str, tmp_path: Path
) -> None:
    """Payers funded with less than the traffic spends: the payments their wallets cannot
    cover are 402, counted as such, and write nothing."""
    settings = _settings(write_db_url, tmp_path)
    key = api_key(settings, PAYMENTS_WRITE)
    wallets_key = api_key(settings, WALLETS_WRITE)
    mix = loadgen.Mix(merchants=5, users=20, seed=5)
    with Server(create_app(settings)) as server:
        funding = asyncio.run(
            loadgen.fund(server.url, wallets_key, loadgen.payers(mix), amount=60_000)
        )
        result = loadgen.run_sync(
            loadgen.Run(url=server.url, api_key=key, connections=4, requests=200), mix
        )

    assert funding.funded == 20
    assert result.connection_errors == 0
    # 200 payments of 25,000 on average from 20 wallets of 60,000: most cannot be covered.
    assert set(result.by_status) == {201, 402}, result.by_status
    assert "top_up" not in result.by_kind  # none in the mix by default
    assert result.insufficient_balance == result.by_status[402] == result.by_kind["payment"][402]
    assert result.insufficient_balance > result.payments
    by_type, _, keys = _stored(settings.resolved_write_db_url())
    assert by_type.get("PaymentCaptured", 0) == by_type.get("WalletDebited", 0) == result.payments
    assert by_type.get("TopUpReceived", 0) == 20
    assert keys == funding.funded + result.payments + result.refunds


def test_funding_fills_wallets_up_to_their_limit(write_db_url: str, tmp_path: Path) -> None:
    """A top-up that would pass a wallet's limit is replaced by one of the headroom the 409
    gives, and a full wallet is left as it is: funding again, as a second run against the same
    system does, ends with full wallets, never with a refusal."""
    settings = _settings(write_db_url, tmp_path).model_copy(update={"wallet_max_balance": 100_000})
    wallets_key = api_key(settings, WALLETS_WRITE)
    users = ["u0", "u1", "u2"]
    with Server(create_app(settings)) as server:

        def funded() -> loadgen.Funding:
            funding = asyncio.run(loadgen.fund(server.url, wallets_key, users, amount=60_000))
            assert funding.complete, funding
            return funding

        first, second, third = funded(), funded(), funded()

    assert (first.funded, first.to_limit, first.at_limit) == (3, 0, 0)
    assert (second.funded, second.to_limit, second.at_limit) == (3, 3, 0)
    assert (third.funded, third.to_limit, third.at_limit) == (0, 0, 3)
    assert dict(third.by_status) == {409: 3}
    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=1)
    try:
        with engine.connect() as conn:
            movements = conn.execute(
                sa.select(wallet_events.c.user_id, wallet_events.c.amount).order_by(
                    wallet_events.c.user_id, wallet_events.c.version
                )
            ).all()
    finally:
        engine.dispose()
    assert movements == [(user, amount) for user in users for amount in (60_000, 40_000)]
