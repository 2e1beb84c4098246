"""API schemas of the query service (responses), distinct from the read tables they come from.

Handlers build plain dicts in these shapes and the routes send them as orjson bytes; the models
document them in OpenAPI. Amounts are integers in the currency's minor unit.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

PaymentStatus = Literal["captured", "partially_refunded", "refunded"]
PaymentMethod = Literal["balance", "card"]


class Freshness(BaseModel):
    as_of: datetime | None = Field(
        description="The read side reflects every event recorded up to this instant (UTC); "
        "null when nothing was ever projected."
    )
    lag_seconds: float | None = Field(
        description="Seconds between `as_of` and the moment of the response; null with `as_of`."
    )


class PaymentOut(BaseModel):
    payment_id: uuid.UUID
    merchant_id: str
    user_id: str
    store_id: str | None
    order_ref: str | None
    method: PaymentMethod
    currency: str
    captured_amount: int = Field(description="Captured amount in minor units.")
    refunded_amount: int = Field(description="Total refunded so far, in minor units.")
    status: PaymentStatus
    version: int = Field(description="How many events the payment has had (1 + refunds).")
    metadata: dict[str, str]
    created_at: datetime = Field(description="When the payment was captured (UTC).")
    updated_at: datetime = Field(description="When its last event happened (UTC).")


class RefundOut(BaseModel):
    refund_id: uuid.UUID
    payment_id: uuid.UUID
    merchant_id: str
    version: int = Field(description="The payment's version this refund made.")
    amount: int = Field(description="This refund's amount in minor units.")
    currency: str
    reason: str | None
    created_at: datetime


class PaymentDetailOut(PaymentOut, Freshness):
    refunds: list[RefundOut] = Field(description="The payment's refunds, oldest first.")


class PaymentPageOut(Freshness):
    items: list[PaymentOut] = Field(description="Newest first (`created_at`, then `payment_id`).")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class BalanceOut(Freshness):
    user_id: str
    balance: int = Field(
        description="The wallet's balance in minor units of `currency`; 0 for a user whose "
        "wallet nothing has moved money in yet."
    )
    currency: str | None = Field(
        description="The wallet's currency, fixed by its first movement; null before it."
    )
    version: int = Field(
        description="How many movements the wallet has had (0: none); its statement's newest "
        "`version`."
    )


MovementKind = Literal["top_up", "payment", "refund", "reward", "reward_takeback"]


class MovementOut(BaseModel):
    version: int = Field(description="The movement's position in the wallet: 1, 2, 3, ...")
    kind: MovementKind = Field(
        description="`top_up`: money in from outside; `payment`: a balance payment; "
        "`refund`: a refund of one; `reward`: a campaign's grant (cashback on a payment, or "
        "the welcome bonus); `reward_takeback`: cashback going back to its campaign after the "
        "payment's refund (or paying off what such a take-back left owed)."
    )
    amount: int = Field(
        description="Signed, in minor units: positive into the wallet, negative out of it."
    )
    currency: str
    balance_after: int = Field(description="The balance this movement left.")
    payment_id: uuid.UUID | None = Field(
        description="The payment (`payment`, `refund`; a cashback's `reward`; `reward_takeback`)."
    )
    refund_id: uuid.UUID | None = Field(description="The refund (`refund`, `reward_takeback`).")
    top_up_id: uuid.UUID | None = Field(description="The top-up (`top_up`).")
    merchant_id: str | None = Field(description="The merchant paid (`payment`, `refund`).")
    source: str | None = Field(description="Where a top-up's money came from (`top_up`).")
    reference: str | None = Field(description="The top-up's reference, if it had one.")
    recorded_at: datetime = Field(description="When the write side recorded it (UTC).")
    campaign_id: str | None = Field(
        description="The campaign that granted it (`reward`), or it goes back to "
        "(`reward_takeback`)."
    )


class StatementPageOut(Freshness):
    items: list[MovementOut] = Field(description="Newest first (by `version`).")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class TotalsOut(BaseModel):
    payments_count: int
    payments_amount: int
    refunds_count: int
    refunds_amount: int
    net_amount: int = Field(description="payments_amount - refunds_amount.")


_BUCKET_SCHEMA = {
    "anyOf": [
        {"type": "string", "format": "date"},
        {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:00:00$"},
    ],
    "description": "The local date (`day`, `2026-11-25`) or the local start of the hour "
    "without an offset (`hour`, `2026-11-25T09:00:00`): the bucket as the merchant's clock "
    "reads it. `start` is the same moment as an instant.",
}


class BucketOut(TotalsOut):
    # A naive local hour is not an RFC 3339 `date-time` (which needs an offset): documented as
    # the string it is.
    bucket: Annotated[date | datetime, WithJsonSchema(_BUCKET_SCHEMA)]
    start: datetime = Field(description="The bucket's first instant, with the merchant's offset.")


class CurrencySummaryOut(TotalsOut):
    currency: str
    buckets: list[BucketOut] = Field(
        description="Every bucket of the range, oldest first; buckets without activity are zero."
    )


class MerchantBalanceOut(BaseModel):
    currency: str
    amount: int = Field(
        description="What kessai owes the merchant in this currency, in minor units: every "
        "payment captured minus every refund, over all time (not only the summary's range)."
    )


class SummaryOut(Freshness):
    merchant_id: str
    time_zone: str = Field(description="The merchant's time zone that buckets are local to.")
    granularity: Literal["day", "hour"]
    from_: datetime = Field(alias="from", description="Start of the first bucket.")
    to: datetime = Field(description="End of the last bucket (exclusive).")
    currencies: list[CurrencySummaryOut] = Field(
        description="One entry per currency with activity in the range; none: an empty list."
    )
    balance: list[MerchantBalanceOut] = Field(
        description="The merchant's balance (its ledger account `merchant:<merchant_id>`, "
        "what kessai owes it) over all time, whatever the range: one entry per currency the "
        "merchant ever had a payment in, by currency; none: an empty list. As of the answer's "
        "`as_of`, like the totals."
    )


class ReconciliationFindingOut(BaseModel):
    kind: str = Field(
        description="missing, mismatch, parked, dead_letter, orphan, outbox_stuck, "
        "daily_totals, hourly_totals, totals_unverified, trial_balance, wallet_chain, "
        "wallet_movement, wallet_balance, campaign, campaign_totals, campaign_budget, "
        "grant_missing..."
    )
    payment_id: uuid.UUID | None
    merchant_id: str | None
    details: dict[str, Any]
    repaired: bool


class CheckOut(BaseModel):
    findings: int = Field(description="The run's findings of the check's kinds.")
    unrepaired: int = Field(description="Of those, the ones left unrepaired.")
    verified_up_to: datetime | None = Field(
        description="How far the check is verified after the run (as `verified_up_to` of the "
        "page says); a dry run and an unrepaired finding of the check leave it as it was."
    )


class ChecksOut(BaseModel):
    """What a run concluded of each of its checks."""

    payments: CheckOut = Field(description="Payment rows, parked events, dead letters, orphans.")
    totals: CheckOut = Field(description="The merchants' day and hour buckets.")
    trial_balance: CheckOut
    wallet_chain: CheckOut
    wallet_movement: CheckOut
    wallet_balance: CheckOut = Field(description="The wallets on the read side.")
    grants: CheckOut | None = Field(
        None,
        description="Each campaign's budget against its grants, and every eligible payment's "
        "(registration's) grant; null for runs recorded before this check existed.",
    )


class VerifiedUpToOut(BaseModel):
    """How far each check is verified, as the runs so far left it: the instant up to which
    everything the check covers is known consistent, from the beginning of the ledger (UTC);
    null: never verified (before its first clean full audit). The totals advance only with a
    full audit; the other checks with incremental runs too."""

    payments: datetime | None
    totals: datetime | None
    trial_balance: datetime | None
    wallet_chain: datetime | None
    wallet_movement: datetime | None
    wallet_balance: datetime | None
    grants: datetime | None


class ReconciliationRunOut(BaseModel):
    run_id: int
    started_at: datetime
    finished_at: datetime | None
    mode: Literal["full", "incremental"]
    scope: str | None = Field(
        description='What the run checked: "everything", or "events recorded after <UTC time>" '
        '(an incremental run; its "consistent" means consistent within that). None for runs '
        "recorded before scopes were."
    )
    dry_run: bool
    watermark_from: str | None
    watermark_to: str | None
    payments_checked: int
    findings_count: int
    repaired_count: int
    outcome: Literal["consistent", "drift", "failed", "stopped"] | None = Field(
        description="None while the run is in progress; stopped: SIGINT/SIGTERM ended it."
    )
    error: str | None
    checks: ChecksOut | None = Field(
        description="Per check, what the run concluded; null for a run that did not complete, "
        "and for runs recorded before checks were."
    )
    findings: list[ReconciliationFindingOut]


class ReconciliationRunsOut(Freshness):
    verified_up_to: VerifiedUpToOut
    items: list[ReconciliationRunOut]
    next_before: int | None = Field(description="Pass as `before` for the next (older) page.")


CampaignStatus = Literal["scheduled", "active", "stopped", "ended", "exhausted"]


class CashbackRulesOut(BaseModel):
    rate_bp: int = Field(description="Basis points of each eligible payment: 2000 = 20%.")
    cap_per_payment: int = Field(description="The most one payment earns, in minor units.")
    cap_per_user_month: int = Field(
        description="The most one user earns in a calendar month of `time_zone`."
    )
    min_payment_amount: int = Field(description="The least payment that earns anything.")
    methods: list[PaymentMethod] = Field(description="The payment methods that earn.")
    merchants: list[str] | None = Field(description="The merchants whose payments earn; null: all.")


class WelcomeBonusRulesOut(BaseModel):
    amount: int = Field(description="What each user who registers within the window gets.")


class CampaignOut(BaseModel):
    campaign_id: str
    name: str
    kind: Literal["cashback", "welcome_bonus"]
    currency: str
    status: CampaignStatus = Field(
        description="As of the moment of the answer: `stopped` from its stop on, `exhausted` "
        "from its exhaustion on, else `ended` from `ends_at`, `scheduled` before `starts_at`, "
        "`active` between."
    )
    starts_at: datetime = Field(description="The first instant that earns.")
    ends_at: datetime = Field(description="The first instant that earns nothing (exclusive).")
    time_zone: str = Field(description="Whose calendar months the per-user cap counts.")
    rules: CashbackRulesOut | WelcomeBonusRulesOut = Field(description="What earns, and how much.")
    budget: int = Field(description="The most the campaign ever grants, in minor units.")
    granted: int = Field(
        description="Every grant projected so far, less what take-backs (after refunds) "
        "brought back, in minor units."
    )
    remaining: int = Field(description="budget - granted, never below 0.")
    grants_count: int = Field(description="How many grants were projected so far.")
    last_hour_since: datetime = Field(
        description="Where the last hour's figures start: the start of the minute an hour "
        "before the answer's (so they span 60 to 61 minutes, up to the answer)."
    )
    granted_last_hour: int = Field(
        description="Granted since `last_hour_since`, less what came back since."
    )
    grants_last_hour: int = Field(description="Grants since `last_hour_since`.")
    projected_exhaustion_at: datetime | None = Field(
        description="When the remaining budget runs out at the last hour's rate; null unless "
        "the campaign is active, granted something in the last hour and would run out before "
        "`ends_at`."
    )
    created_at: datetime
    stopped_at: datetime | None
    exhausted_at: datetime | None
    version: int = Field(description="How many events the campaign has had (1: its creation).")
    updated_at: datetime = Field(description="When its newest event happened.")


class CampaignDetailOut(CampaignOut, Freshness):
    pass


class CampaignPageOut(Freshness):
    items: list[CampaignOut] = Field(description="By `campaign_id`.")
    next_after: str | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )
