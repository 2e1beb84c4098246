"""Wallet streams for tests of the read side: consistent histories built with the event contract
(kessai/events.py), and the Kafka record the relay publishes for each event.

The relay publishes a wallet event exactly as a payment event, on the same topic: key
``kafka_key(wallet_stream_id(user_id))``, value ``wallet_event_to_json(event)``, headers
``kafka_headers(event_type, schema_version, event_id)``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    TopUpReceived,
    TopUpReceivedPayload,
    WalletCredited,
    WalletCreditedPayload,
    WalletDebited,
    WalletDebitedPayload,
    event_to_json,
    kafka_headers,
    kafka_key,
    wallet_event_to_json,
    wallet_stream_id,
)
from kessai.ids import new_id
from kessai.postings import topup_account, transfer, user_account

WalletEvent = TopUpReceived | WalletDebited | WalletCredited
AnyEvent = PaymentCaptured | PaymentRefunded | WalletEvent
Step = tuple[Literal["top_up", "payment", "refund"], int]
"""A movement to build: its kind and its (unsigned) amount."""
T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def wallet_history(
    user_id: str,
    steps: Sequence[Step],
    *,
    merchant_id: str = "shop-1",
    currency: str = "JPY",
    start: datetime = T0,
    source: str = "bank",
) -> list[WalletEvent]:
    """A wallet's stream from version 1, one event per step, a minute apart, each with the
    balance it leaves. A refund credits back the wallet's latest payment."""
    events: list[WalletEvent] = []
    balance = 0
    payment_id: uuid.UUID | None = None
    for version, (kind, amount) in enumerate(steps, start=1):
        at = start + timedelta(minutes=version)
        common = {
            "event_id": new_id(),
            "user_id": user_id,
            "version": version,
            "occurred_at": at,
            "recorded_at": at,
        }
        if kind == "top_up":
            balance += amount
            events.append(
                TopUpReceived(
                    **common,
                    postings=transfer(topup_account(source), user_account(user_id), amount),
                    payload=TopUpReceivedPayload(
                        top_up_id=new_id(),
                        amount=amount,
                        currency=currency,
                        source=source,
                        reference=f"ref-{version}",
                        balance_after=balance,
                    ),
                )
            )
        elif kind == "payment":
            balance -= amount
            payment_id = new_id()
            events.append(
                WalletDebited(
                    **common,
                    payload=WalletDebitedPayload(
                        payment_id=payment_id,
                        merchant_id=merchant_id,
                        amount=amount,
                        currency=currency,
                        balance_after=balance,
                    ),
                )
            )
        else:
            assert payment_id is not None, "a refund needs a payment before it"
            balance += amount
            events.append(
                WalletCredited(
                    **common,
                    payload=WalletCreditedPayload(
                        payment_id=payment_id,
                        refund_id=new_id(),
                        merchant_id=merchant_id,
                        amount=amount,
                        currency=currency,
                        balance_after=balance,
                    ),
                )
            )
    return events


def record_parts(event: AnyEvent) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the Kafka record the relay publishes for ``event``."""
    headers = kafka_headers(event.event_type, event.schema_version, event.event_id)
    if isinstance(event, PaymentCaptured | PaymentRefunded):
        return kafka_key(event.payment_id), event_to_json(event), headers
    return kafka_key(wallet_stream_id(event.user_id)), wallet_event_to_json(event), headers
