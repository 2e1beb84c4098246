"""The event contract: the one definition of what the write store records and Kafka carries.

Every event is an envelope (who, which payment, which version, when) around a payload (what
happened). Names are past tense. ``version`` counts a payment's events: 1 is always
``PaymentCaptured``, each refund adds one. The projector and the reconciler rely on versions
being gap-free per payment; the write store's primary key ``(payment_id, version)`` enforces it.

Changing a payload in a way old readers cannot parse means a new ``schema_version``; readers
refuse (dead-letter) a schema version newer than they know. Version 2 added ``postings``: how
the event moves money between accounts (``kessai/postings.py``), balanced. Events of version 1
have none; their readers derive them (``kessai.ledger.postings_of``): stored events are never
rewritten.

Wallets have streams of their own (``wallet_events``; the end of this module): a top-up, the
wallet's side of a balance payment and of its refund, a campaign's grant and its take-back,
each with the balance it leaves.
A user's registration is a stream too (``UserRegistered``, its only event), which moves no money.
"""

from __future__ import annotations

import functools
import uuid
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

from kessai.money import MAX_AMOUNT
from kessai.postings import (
    TOPUP_SOURCE_PATTERN,
    Posting,
    campaign_account,
    imbalance,
    topup_account,
    transfer,
    user_account,
)

SCHEMA_VERSION = 2
"""The schema version this code writes, and the newest it can read."""
POSTINGS_SINCE = 2
"""The first schema version whose events carry their postings."""

MerchantId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
UserId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT, strict=True)]
CurrencyCode = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
PaymentMethod = Literal["balance", "card"]
AuthorizationId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,128}$")]
"""The acquirer's id of a card authorization: 1-128 printable ASCII characters."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PaymentCapturedPayload(_Frozen):
    amount: Amount
    """Captured amount in the currency's minor unit."""
    currency: CurrencyCode
    user_id: UserId
    method: PaymentMethod
    store_id: str | None = None
    order_ref: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    device_id: str | None = None
    # Written only when present: a balance payment's event stays byte for byte what it was
    # before the field existed, so readers of schema version 1 that predate the field still
    # read it. (A card event with the field needs readers that know it: projector and
    # reconciler ship with the command API; deploy them first.) ``exclude_if`` rather than a
    # wrapping model serializer, which costs a Python round trip of the whole payload.
    authorization_id: AuthorizationId | None = Field(None, exclude_if=lambda value: value is None)
    """The acquirer's authorization of a card payment; absent for balance payments and for
    card payments captured before authorizations existed."""


class PaymentRefundedPayload(_Frozen):
    refund_id: uuid.UUID
    amount: Amount
    """This refund's amount in minor units."""
    currency: CurrencyCode
    refunded_amount: Annotated[int, Field(gt=0, le=MAX_AMOUNT)]
    """Total refunded for the payment after this refund."""
    reason: str | None = None


class _Envelope(_Frozen):
    event_id: uuid.UUID
    """UUIDv7, unique per event, time-ordered by when the write side recorded it."""
    schema_version: int = Field(1, ge=1)
    """1 without postings, 2 with them, unless given (see ``_schema_version_by_postings``)."""
    payment_id: uuid.UUID
    version: int = Field(ge=1)
    """Position of this event in its payment's history: 1, 2, 3, ... without gaps."""
    merchant_id: MerchantId
    occurred_at: AwareDatetime
    """When the business fact happened (the request's time)."""
    recorded_at: AwareDatetime
    """When the write store recorded it."""
    postings: tuple[Posting, ...] | None = Field(
        None, min_length=2, exclude_if=lambda value: value is None
    )
    """How the event moves money, balanced (schema version 2 on; absent before)."""

    @model_validator(mode="before")
    @classmethod
    def _schema_version_by_postings(cls, data: Any) -> Any:
        """An event built without a schema version gets the one its postings say: the
        current one with postings, 1 without (what it would have been stored as)."""
        if isinstance(data, dict) and "schema_version" not in data:
            with_postings = data.get("postings") is not None
            return {**data, "schema_version": SCHEMA_VERSION if with_postings else 1}
        return data

    @model_validator(mode="after")
    def _postings_match_the_schema_version(self) -> Self:
        if self.schema_version > SCHEMA_VERSION:
            return self  # the readers refuse what they do not know (dead letters), not parsing
        if self.schema_version < POSTINGS_SINCE:
            if self.postings is not None:
                raise ValueError(f"schema_version {self.schema_version} carries no postings")
        elif self.postings is None:
            raise ValueError(f"schema_version {self.schema_version} carries its postings")
        elif imbalance(self.postings) != 0:
            raise ValueError(f"postings sum to {imbalance(self.postings)}, not 0")
        return self


class PaymentCaptured(_Envelope):
    event_type: Literal["PaymentCaptured"] = "PaymentCaptured"
    payload: PaymentCapturedPayload


class PaymentRefunded(_Envelope):
    event_type: Literal["PaymentRefunded"] = "PaymentRefunded"
    payload: PaymentRefundedPayload


Event = Annotated[PaymentCaptured | PaymentRefunded, Field(discriminator="event_type")]
EVENT_TYPES: tuple[str, ...] = ("PaymentCaptured", "PaymentRefunded")

_event_adapter: TypeAdapter[PaymentCaptured | PaymentRefunded] = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> PaymentCaptured | PaymentRefunded:
    """Parse an event from its JSON form (raises ``pydantic.ValidationError``)."""
    return _event_adapter.validate_json(raw)


def event_to_json(event: PaymentCaptured | PaymentRefunded) -> bytes:
    """The canonical JSON form, as stored in the write store and carried on Kafka."""
    return event.model_dump_json().encode()


def kafka_headers(
    event_type: str, schema_version: int, event_id: uuid.UUID, *, replay: bool = False
) -> list[tuple[str, bytes]]:
    """Headers every published event carries; consumers can route without parsing the value.
    ``replay`` marks an event re-published by the reconciler."""
    headers = [
        ("event_type", event_type.encode()),
        ("schema_version", str(schema_version).encode()),
        ("event_id", str(event_id).encode()),
    ]
    if replay:
        headers.append(("replay", b"1"))
    return headers


def kafka_key(payment_id: uuid.UUID) -> bytes:
    """Kafka key = payment id, so one payment's events share a partition and keep their order."""
    return str(payment_id).encode()


# -- wallet streams ----------------------------------------------------------------------------
# Each user's wallet is a stream of its own (``wallet_events``, kessai/wallets.py): version 1,
# 2, ... without gaps, each movement with the balance it leaves. Born at schema version 2.

WALLET_NAMESPACE = uuid.UUID("0193a6c1-5e7a-7b3c-9d2e-6b61c0ffee01")
"""The namespace of wallets' stream ids (UUIDv5 of ``user:<id>``)."""
TopUpSource = Annotated[str, Field(pattern=TOPUP_SOURCE_PATTERN)]
Reference = Annotated[str, Field(pattern=r"^[\x20-\x7e]{1,128}$")]
Balance = Annotated[int, Field(ge=0, strict=True)]
"""A wallet's balance after a movement: never below zero."""


@functools.lru_cache(maxsize=1 << 16)
def wallet_stream_id(user_id: str) -> uuid.UUID:
    """The id of a user's wallet stream: the same for the same user everywhere (its Kafka key
    and outbox rows), and never a payment's (UUIDv5, where payments are UUIDv7). Cached: a
    SHA-1 per wallet event was about 1% of the command API's CPU."""
    return uuid.uuid5(WALLET_NAMESPACE, user_account(user_id))


class _WalletEnvelope(_Frozen):
    event_id: uuid.UUID
    schema_version: int = Field(SCHEMA_VERSION, ge=2)
    user_id: UserId
    version: int = Field(ge=1)
    """Position of this movement in the wallet's stream: 1, 2, 3, ... without gaps."""
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    postings: tuple[Posting, ...] | None = Field(
        None, min_length=2, exclude_if=lambda value: value is None
    )


class TopUpReceivedPayload(_Frozen):
    top_up_id: uuid.UUID
    amount: Amount
    currency: CurrencyCode
    source: TopUpSource
    """Where the money came from: ``bank``, ``card``, ``convenience_store``, ..."""
    reference: Reference | None = None
    balance_after: Balance


class TopUpReceived(_WalletEnvelope):
    """Money into a wallet from outside: the only wallet movement that posts itself
    (``world:topup:<source>`` -> ``user:<id>``)."""

    event_type: Literal["TopUpReceived"] = "TopUpReceived"
    payload: TopUpReceivedPayload

    @model_validator(mode="after")
    def _posts_from_its_source_to_the_wallet(self) -> Self:
        p = self.payload
        expected = transfer(topup_account(p.source), user_account(self.user_id), p.amount)
        if self.schema_version <= SCHEMA_VERSION and self.postings != expected:
            raise ValueError(f"a top-up posts {expected}, not {self.postings}")
        return self


class WalletDebitedPayload(_Frozen):
    payment_id: uuid.UUID
    merchant_id: MerchantId
    amount: Amount
    currency: CurrencyCode
    balance_after: Balance


class WalletCreditedPayload(_Frozen):
    payment_id: uuid.UUID
    refund_id: uuid.UUID
    merchant_id: MerchantId
    amount: Amount
    currency: CurrencyCode
    balance_after: Balance


class _WalletSideOfAPayment(_WalletEnvelope):
    @model_validator(mode="after")
    def _posts_nothing_itself(self) -> Self:
        # The payment's (or refund's) own event carries the postings: posting them here too
        # would count the movement twice in the trial balance.
        if self.postings is not None:
            raise ValueError(f"{type(self).__name__} carries no postings; its payment does")
        return self


class WalletDebited(_WalletSideOfAPayment):
    """A balance payment, as its wallet sees it: the amount out and the balance left."""

    event_type: Literal["WalletDebited"] = "WalletDebited"
    payload: WalletDebitedPayload


class WalletCredited(_WalletSideOfAPayment):
    """A refund of a balance payment, as its wallet sees it: the amount back."""

    event_type: Literal["WalletCredited"] = "WalletCredited"
    payload: WalletCreditedPayload


RewardKind = Literal["cashback", "welcome_bonus"]


class RewardGrantedPayload(_Frozen):
    campaign_id: MerchantId
    """The campaign that grants it (``campaign:<id>`` is the account it comes from)."""
    kind: RewardKind
    payment_id: uuid.UUID | None = None
    """The captured payment a cashback is for; ``None`` for a welcome bonus."""
    amount: Amount
    """What the wallet receives."""
    requested: Amount
    """What the rules gave before the budget: ``amount`` unless the budget's remainder cut it
    (``cut``)."""
    currency: CurrencyCode
    balance_after: Balance

    @property
    def cut(self) -> bool:
        return self.amount < self.requested

    @model_validator(mode="after")
    def _a_cut_only_lowers(self) -> Self:
        if self.amount > self.requested:
            raise ValueError("a grant is at most what the rules gave (requested)")
        if (self.kind == "cashback") != (self.payment_id is not None):
            raise ValueError("a cashback names its payment; a welcome bonus names none")
        return self


class RewardGranted(_WalletEnvelope):
    """A campaign's grant into a wallet (cashback on a payment, or the welcome bonus): posts
    ``campaign:<id>`` -> ``user:<id>``. Written by the rewards service."""

    event_type: Literal["RewardGranted"] = "RewardGranted"
    payload: RewardGrantedPayload

    @model_validator(mode="after")
    def _posts_from_its_campaign_to_the_wallet(self) -> Self:
        p = self.payload
        expected = transfer(campaign_account(p.campaign_id), user_account(self.user_id), p.amount)
        if self.schema_version <= SCHEMA_VERSION and self.postings != expected:
            raise ValueError(f"a grant posts {expected}, not {self.postings}")
        return self


TakeBackKind = Literal["refund", "debt"]
"""``refund``: taken back when the payment's refund was recorded; ``debt``: paid off later, from
a credit to the wallet, of what such a take-back left owed."""


class RewardTakenBackPayload(_Frozen):
    campaign_id: MerchantId
    """The campaign the cashback goes back to (``campaign:<id>``)."""
    kind: TakeBackKind
    payment_id: uuid.UUID
    """The refunded payment whose cashback this is."""
    refund_id: uuid.UUID
    """The refund that made it due."""
    due: Amount
    """What was due at this event: the refund's share of the cashback (``kind`` ``refund``),
    or what was still owed of it (``debt``)."""
    amount: Amount
    """What the wallet gives back now: ``min(balance, due)``."""
    owed: Annotated[int, Field(ge=0, strict=True)]
    """``due - amount``: what the user still owes the campaign after this event."""
    currency: CurrencyCode
    balance_after: Balance

    @model_validator(mode="after")
    def _gives_back_at_most_what_is_due(self) -> Self:
        if self.amount + self.owed != self.due:
            raise ValueError(f"{self.amount} given back and {self.owed} owed is not {self.due}")
        return self


class RewardTakenBack(_WalletEnvelope):
    """Cashback going back from a wallet to its campaign (posts ``user:<id>`` ->
    ``campaign:<id>``), because its payment was refunded: at the refund (``kind`` ``refund``),
    or later, from a credit, paying off what the wallet could not give back then (``debt``).
    Written by the rewards service, only for an ``amount`` above zero: a wallet with nothing
    to give moves not, and its debt alone is recorded (``reward_debts``)."""

    event_type: Literal["RewardTakenBack"] = "RewardTakenBack"
    payload: RewardTakenBackPayload

    @model_validator(mode="after")
    def _posts_from_the_wallet_to_its_campaign(self) -> Self:
        p = self.payload
        expected = transfer(user_account(self.user_id), campaign_account(p.campaign_id), p.amount)
        if self.schema_version <= SCHEMA_VERSION and self.postings != expected:
            raise ValueError(f"a take-back posts {expected}, not {self.postings}")
        return self


AnyWalletEvent = TopUpReceived | WalletDebited | WalletCredited | RewardGranted | RewardTakenBack
WalletEvent = Annotated[AnyWalletEvent, Field(discriminator="event_type")]

_wallet_event_adapter: TypeAdapter[AnyWalletEvent] = TypeAdapter(WalletEvent)


def parse_wallet_event(raw: bytes | str) -> AnyWalletEvent:
    """Parse a wallet event from its JSON form (raises ``pydantic.ValidationError``)."""
    return _wallet_event_adapter.validate_json(raw)


def wallet_event_to_json(event: AnyWalletEvent) -> bytes:
    return event.model_dump_json().encode()


# -- registrations -------------------------------------------------------------------------------
# A user's registration is a stream of its own with one event, ``UserRegistered`` at version 1:
# the write store's ``user_registrations`` holds one row per user (its primary key), so a user is
# registered once. It moves no money: no postings. Its stream id must be neither a payment's
# (UUIDv7) nor a wallet's (UUIDv5): it is a UUIDv3 of ``user:<id>`` in a namespace of its own,
# so a reader tells the three kinds of stream apart by the id's version alone.

REGISTRATION_NAMESPACE = uuid.UUID("0193a6c1-5e7a-7b3c-9d2e-6b61c0ffee02")
"""The namespace of registrations' stream ids (UUIDv3 of ``user:<id>``)."""
DeviceId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,128}$")]
"""A device's id, as payments carry it (``X-Device-Id``): 1-128 printable ASCII characters
without spaces."""


def registration_stream_id(user_id: str) -> uuid.UUID:
    """The id of a user's registration stream (its Kafka key and outbox row): the same for the
    same user everywhere, and never a payment's (UUIDv7) nor a wallet's (UUIDv5): a UUIDv3."""
    return uuid.uuid3(REGISTRATION_NAMESPACE, user_account(user_id))


class UserRegisteredPayload(_Frozen):
    device_id: DeviceId | None = None
    """The device the user registered from, if the client said."""
    referrer: UserId | None = None
    """The user who referred this one, if any (never the user itself)."""


class UserRegistered(_Frozen):
    """A user registered: the only event of the user's registration stream (version 1). It
    moves no money: no postings."""

    event_type: Literal["UserRegistered"] = "UserRegistered"
    event_id: uuid.UUID
    schema_version: int = Field(SCHEMA_VERSION, ge=2)
    user_id: UserId
    version: Literal[1] = 1
    """A registration stream holds this one event."""
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    payload: UserRegisteredPayload

    @model_validator(mode="after")
    def _not_its_own_referrer(self) -> Self:
        if self.payload.referrer == self.user_id:
            raise ValueError("a user is not its own referrer")
        return self


def registration_to_json(event: UserRegistered) -> bytes:
    return event.model_dump_json().encode()


# -- the topic ----------------------------------------------------------------------------------
# One topic carries every kind of stream (payments, wallets, registrations); a record is keyed
# by its stream's id.

AnyEvent = (
    PaymentCaptured
    | PaymentRefunded
    | TopUpReceived
    | WalletDebited
    | WalletCredited
    | RewardGranted
    | RewardTakenBack
    | UserRegistered
)

_any_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(
    Annotated[AnyEvent, Field(discriminator="event_type")]
)


def parse_any_event(raw: bytes | str) -> AnyEvent:
    """A payment's, a wallet's or a registration's event from its JSON form, by its
    ``event_type`` (raises ``pydantic.ValidationError``)."""
    return _any_event_adapter.validate_json(raw)


def stream_of(event: AnyEvent) -> uuid.UUID:
    """The id of the event's stream: its Kafka key and its outbox rows' ``payment_id`` (the
    payment's id, ``wallet_stream_id`` of the wallet's user, or ``registration_stream_id`` of
    the registered user)."""
    if isinstance(event, PaymentCaptured | PaymentRefunded):
        return event.payment_id
    if isinstance(event, UserRegistered):
        return registration_stream_id(event.user_id)
    return wallet_stream_id(event.user_id)
