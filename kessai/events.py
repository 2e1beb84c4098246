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
"""

from __future__ import annotations

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
from kessai.postings import Posting, imbalance

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
