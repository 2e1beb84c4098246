"""Wallet streams for tests of the read side: consistent histories built with the event contract
(kessai/events.py), campaigns' streams (kessai/campaigns.py), and the Kafka record the relay
publishes for each event.

The relay publishes a wallet event exactly as a payment event, on the same topic: key
``kafka_key(wallet_stream_id(user_id))``, value ``wallet_event_to_json(event)``, headers
``kafka_headers(event_type, schema_version, event_id)``.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from kessai.campaigns import (
    AnyCampaignEvent,
    CampaignCreated,
    CashbackRules,
    WelcomeBonusRules,
    campaign_event_to_json,
    campaign_stream_id,
    decide_create,
)
from kessai.events import (
    AnyWalletEvent,
    PaymentCaptured,
    PaymentRefunded,
    RewardGranted,
    RewardGrantedPayload,
    RewardTakenBack,
    RewardTakenBackPayload,
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
from kessai.postings import campaign_account, topup_account, transfer, user_account
from kessai.schema.write import campaign_budget, reward_grants
from kessai.write_store import append_events, load_granted

WalletEvent = AnyWalletEvent
AnyEvent = PaymentCaptured | PaymentRefunded | WalletEvent | AnyCampaignEvent
Step = tuple[Literal["top_up", "payment", "refund", "cashback", "bonus"], int]
"""A movement to build: its kind and its (unsigned) amount. ``cashback`` is a grant on the
wallet's latest payment, ``bonus`` a welcome bonus, both from the history's campaign."""
T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def wallet_history(
    user_id: str,
    steps: Sequence[Step],
    *,
    merchant_id: str = "shop-1",
    currency: str = "JPY",
    start: datetime = T0,
    source: str = "bank",
    campaign_id: str = "camp-1",
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
        elif kind in ("cashback", "bonus"):
            balance += amount
            events.append(
                granted(
                    user_id,
                    amount,
                    balance_after=balance,
                    campaign_id=campaign_id,
                    payment_id=payment_id if kind == "cashback" else None,
                    version=version,
                    at=at,
                    currency=currency,
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


def granted(
    user_id: str,
    amount: int,
    *,
    balance_after: int,
    version: int,
    at: datetime = T0,
    campaign_id: str = "camp-1",
    payment_id: uuid.UUID | None = None,
    requested: int | None = None,
    currency: str = "JPY",
) -> RewardGranted:
    """A grant of ``campaign_id`` into the user's wallet at ``version``: a cashback on
    ``payment_id``, or a welcome bonus without one."""
    return RewardGranted(
        event_id=new_id(),
        user_id=user_id,
        version=version,
        occurred_at=at,
        recorded_at=at,
        postings=transfer(campaign_account(campaign_id), user_account(user_id), amount),
        payload=RewardGrantedPayload(
            campaign_id=campaign_id,
            kind="cashback" if payment_id is not None else "welcome_bonus",
            payment_id=payment_id,
            amount=amount,
            requested=requested or amount,
            currency=currency,
            balance_after=balance_after,
        ),
    )


def taken_back(
    grant: RewardGranted,
    amount: int,
    *,
    balance_after: int,
    version: int,
    at: datetime = T0,
    owed: int = 0,
    refund_id: uuid.UUID | None = None,
) -> RewardTakenBack:
    """A take-back of ``amount`` of the cashback ``grant`` from its wallet at ``version``, after
    a refund of its payment, ``owed`` left to pay."""
    assert grant.payload.payment_id is not None, "a welcome bonus is never taken back"
    campaign_id, user_id = grant.payload.campaign_id, grant.user_id
    return RewardTakenBack(
        event_id=new_id(),
        user_id=user_id,
        version=version,
        occurred_at=at,
        recorded_at=at,
        postings=transfer(user_account(user_id), campaign_account(campaign_id), amount),
        payload=RewardTakenBackPayload(
            campaign_id=campaign_id,
            kind="refund",
            payment_id=grant.payload.payment_id,
            refund_id=refund_id or new_id(),
            due=amount + owed,
            amount=amount,
            owed=owed,
            currency=grant.payload.currency,
            balance_after=balance_after,
        ),
    )


def book_grants(
    conn: sa.Connection, grants: Sequence[RewardGranted | RewardTakenBack], *, shards: int
) -> None:
    """``grants`` (and take-backs) appended with the rows the rewards service writes beside
    them in its transaction (``rewards.store``): a ``reward_grants`` row each (a cashback's
    period is the grant's month in Tokyo; a take-back's row, keyed ``<payment>/<refund>``,
    holds ``-due``), and each campaign's next ``campaign_budget`` row (moved by what the
    wallets gave or gave back). So the reconciler finds each campaign's budget equal to its
    grants."""
    append_events(conn, grants, shards=shards)
    batches: dict[str, list[int]] = defaultdict(list)
    for g in grants:
        p = g.payload
        if isinstance(g, RewardTakenBack):
            period = g.occurred_at.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m")
            key, row_amount, moved = f"{p.payment_id}/{p.refund_id}", -p.due, -p.amount
        elif p.payment_id is not None:
            period = g.occurred_at.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m")
            key, row_amount, moved = str(p.payment_id), p.amount, p.amount
        else:
            period, key, row_amount, moved = "welcome", "user", p.amount, p.amount
        conn.execute(
            reward_grants.insert().values(
                campaign_id=p.campaign_id, user_id=g.user_id, period=period, grant_key=key,
                amount=row_amount, currency=p.currency, event_id=g.event_id,
                recorded_at=g.recorded_at,
            )
        )  # fmt: skip
        batches[p.campaign_id].append(moved)
    before = load_granted(conn, batches)
    for campaign_id, amounts in sorted(batches.items()):
        conn.execute(
            campaign_budget.insert().values(
                campaign_id=campaign_id,
                version=before[campaign_id].version + 1,
                amount=sum(amounts),
                grants=sum(1 for a in amounts if a > 0),
                granted_after=before[campaign_id].amount + sum(amounts),
                recorded_at=grants[0].recorded_at,
            )
        )


def created(
    campaign_id: str = "camp-1",
    *,
    budget: int = 1_000_000,
    starts_at: datetime = T0,
    ends_at: datetime = T0 + timedelta(days=10),
    kind: Literal["cashback", "welcome_bonus"] = "cashback",
    at: datetime = T0,
    currency: str = "JPY",
) -> CampaignCreated:
    """A campaign's creation (version 1 of its stream), decided at ``at``: 20% back, at most
    1,000 a payment and 10,000 a month (cashback), or the 500-yen bonus."""
    common = {
        "campaign_id": campaign_id,
        "name": f"Campaign {campaign_id}",
        "currency": currency,
        "budget": budget,
        "starts_at": starts_at,
        "ends_at": ends_at,
    }
    rules = (
        CashbackRules(**common, rate_bp=2000, cap_per_payment=1_000, cap_per_user_month=10_000)
        if kind == "cashback"
        else WelcomeBonusRules(**common, amount=500)
    )
    return decide_create(rules, now=at, actor="admin-key")


def record_parts(event: AnyEvent) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the Kafka record the relay publishes for ``event``."""
    headers = kafka_headers(event.event_type, event.schema_version, event.event_id)
    if isinstance(event, PaymentCaptured | PaymentRefunded):
        return kafka_key(event.payment_id), event_to_json(event), headers
    if isinstance(event, AnyCampaignEvent):
        stream = kafka_key(campaign_stream_id(event.campaign_id))
        return stream, campaign_event_to_json(event), headers
    return kafka_key(wallet_stream_id(event.user_id)), wallet_event_to_json(event), headers
