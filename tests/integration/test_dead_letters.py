"""Operators see and retry dead letters with ``kessai dead-letters``, on both backends."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

import projector.apply
from kessai.clock import utcnow
from kessai.events import (
    SCHEMA_VERSION,
    event_to_json,
    kafka_headers,
    kafka_key,
    wallet_stream_id,
)
from kessai.ids import new_id
from kessai.schema.read import dead_letters, parked_events, payments, wallet_movements, wallets
from kessai_cli.main import app
from projector.apply import Record, apply_batch, decode_batch
from projector.repository import load_snapshot, write_changes
from tests.unit.test_projector_apply import captured, refunded
from tests.wallet_streams import record_parts, wallet_history

NEWER = str(SCHEMA_VERSION + 1).encode()
"""A schema version newer than this projector reads (a writer deployed ahead of it)."""


def apply_records(engine: Engine, records: list[Record]) -> None:
    with engine.begin() as conn:
        snapshot = load_snapshot(conn, decode_batch(records).stream_ids)
        changes = apply_batch(records, snapshot, lambda _m: ZoneInfo("Asia/Tokyo"))
        write_changes(conn, changes, snapshot, utcnow())


def as_record(event: object, offset: int, *, schema_header: bytes | None = None) -> Record:
    from kessai.events import PaymentCaptured, PaymentRefunded

    assert isinstance(event, PaymentCaptured | PaymentRefunded)
    headers = kafka_headers(event.event_type, event.schema_version, event.event_id)
    if schema_header is not None:
        headers = [(k, schema_header if k == "schema_version" else v) for k, v in headers]
    return Record(
        "kessai.payments.v1", 0, offset, kafka_key(event.payment_id), event_to_json(event),
        tuple(headers),
    )  # fmt: skip


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, read_db_url: str) -> CliRunner:
    monkeypatch.setenv("KESSAI_READ_DB_URL", read_db_url)
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def test_list_shows_open_dead_letters_and_retry_reports_one_that_still_fails(
    cli: CliRunner, read_engine: Engine
) -> None:
    pid = new_id()
    apply_records(
        read_engine,
        [
            as_record(captured(pid), 0),
            Record("kessai.payments.v1", 0, 1, kafka_key(pid), b"not json"),
        ],
    )
    listed = cli.invoke(app, ["dead-letters", "list"])
    assert listed.exit_code == 0, listed.output
    assert str(pid) in listed.output
    assert "undecodable event" in listed.output
    assert "1 dead letter(s)" in listed.output

    with read_engine.connect() as conn:
        letter_id = conn.execute(sa.select(dead_letters.c.dead_letter_id)).scalar_one()
    retried = cli.invoke(app, ["dead-letters", "retry", str(letter_id)])
    assert retried.exit_code == 1
    assert "still failing" in retried.output
    with read_engine.connect() as conn:
        assert conn.execute(sa.select(dead_letters.c.status)).scalar_one() == "open"


def test_a_letter_a_newer_projector_understands_is_applied_with_everything_behind_it(
    cli: CliRunner, read_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = new_id()
    apply_records(
        read_engine,
        [
            as_record(captured(pid), 0),
            as_record(refunded(pid, 2, 100, 100), 1, schema_header=NEWER),
            as_record(refunded(pid, 3, 50, 150), 2),
        ],
    )
    with read_engine.connect() as conn:
        assert conn.execute(sa.select(payments.c.version)).scalar_one() == 1
        assert conn.execute(sa.select(parked_events.c.reason)).scalar_one() == "blocked"

    # The operator deploys a projector that reads the newer schema, then retries every letter.
    monkeypatch.setattr(projector.apply, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    retried = cli.invoke(app, ["dead-letters", "retry", "--all"])
    assert retried.exit_code == 0, retried.output
    assert "resolved" in retried.output
    with read_engine.connect() as conn:
        row = conn.execute(sa.select(payments)).one()
        assert (row.version, row.refunded_amount, row.status) == (3, 150, "partially_refunded")
        assert conn.execute(sa.select(sa.func.count()).select_from(parked_events)).scalar() == 0
        assert conn.execute(sa.select(dead_letters.c.status)).scalar_one() == "resolved"
    again = cli.invoke(app, ["dead-letters", "list"])
    assert "0 dead letter(s)" in again.output


def test_a_wallet_letter_is_retried_like_a_payment_one_with_its_blocked_movements(
    cli: CliRunner, read_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two, three = wallet_history("u1", [("top_up", 1_000), ("payment", 400), ("refund", 100)])
    records = []
    for offset, event in enumerate((one, two, three)):
        key, value, headers = record_parts(event)
        if event is two:  # written by a newer writer than this projector
            headers = [(k, NEWER if k == "schema_version" else v) for k, v in headers]
        records.append(Record("kessai.payments.v1", 0, offset, key, value, tuple(headers)))
    apply_records(read_engine, records)
    with read_engine.connect() as conn:
        assert conn.execute(sa.select(wallets.c.version)).scalar_one() == 1
        assert conn.execute(sa.select(parked_events.c.reason)).scalar_one() == "blocked"
        letter = conn.execute(sa.select(dead_letters)).one()
    assert (letter.payment_id, letter.version) == (wallet_stream_id("u1"), 2)

    monkeypatch.setattr(projector.apply, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    retried = cli.invoke(app, ["dead-letters", "retry", "--all"])
    assert retried.exit_code == 0, retried.output
    with read_engine.connect() as conn:
        wallet = conn.execute(sa.select(wallets)).one()
        assert (wallet.balance, wallet.version) == (700, 3)
        lines = conn.execute(
            sa.select(wallet_movements.c.version, wallet_movements.c.balance_after).order_by(
                wallet_movements.c.version
            )
        ).all()
        assert [tuple(line) for line in lines] == [(1, 1_000), (2, 600), (3, 700)]
        assert conn.execute(sa.select(sa.func.count()).select_from(parked_events)).scalar() == 0
        assert conn.execute(sa.select(dead_letters.c.status)).scalar_one() == "resolved"
