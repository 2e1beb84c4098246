"""API schemas of the command service (request bodies and responses), distinct from both the
table definitions and the event contract."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from kessai.events import DeviceId, MerchantId, PaymentMethod, UserId
from kessai.money import CURRENCY_EXPONENTS, MAX_AMOUNT, is_known_currency

# Printable text without control characters: what a person or a receipt would show.
PrintableText = r"^[^\x00-\x1f\x7f]*$"
METADATA_MAX_PAIRS = 20
METADATA_MAX_BYTES = 2048
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512

CURRENCY_CODES: list[JsonValue] = [*sorted(CURRENCY_EXPONENTS)]
"""What ``currency`` may be, in the document: the codes ``is_known_currency`` accepts."""

RequestAmount = Annotated[int, Field(strict=True, ge=1, le=MAX_AMOUNT)]
"""An amount in minor units as a request carries it: a JSON integer from 1 to 10^12, written
as one. ``1200.0`` is refused like ``12.5``, ``"1200"`` and ``true``: a float in a client's
money path is a bug to surface, not a number to round. (A JSON Schema ``integer`` cannot say
so, 1200.0 being the number 1200 to a validator: the description does.)"""
_INTEGER_AS_WRITTEN = ' Written as an integer: `1200.0`, `"1200"` and `true` are refused.'

# Pydantic documents a dict's key constraints as ``patternProperties``, which leaves keys
# outside the pattern unconstrained in the document; this says what the validation enforces.
_METADATA_SCHEMA = {
    "type": "object",
    "maxProperties": METADATA_MAX_PAIRS,
    "propertyNames": {
        "type": "string",
        "minLength": 1,
        "maxLength": METADATA_KEY_MAX,
        "pattern": PrintableText,
    },
    "additionalProperties": {
        "type": "string",
        "maxLength": METADATA_VALUE_MAX,
        "pattern": PrintableText,
    },
    "description": f"Up to {METADATA_MAX_PAIRS} string pairs, {METADATA_MAX_BYTES} bytes of "
    "keys and values (UTF-8) in all.",
}


def _known_currency(value: str) -> str:
    if not is_known_currency(value):
        raise ValueError("must be an active ISO 4217 currency code in upper case, e.g. JPY")
    return value


Currency = Annotated[
    str,
    Field(
        description="Active ISO 4217 code, upper case; the amount is in its minor unit.",
        json_schema_extra={"enum": CURRENCY_CODES},
    ),
    AfterValidator(_known_currency),
]

TopUpSource = Literal["bank", "card", "convenience_store"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class CreatePayment(_Request):
    """Capture a payment. Amounts are integers in the currency's minor unit."""

    merchant_id: MerchantId
    user_id: UserId
    amount: RequestAmount = Field(
        description="Integer amount in minor units, 1 to 10^12." + _INTEGER_AS_WRITTEN
    )
    currency: Currency = "JPY"
    method: PaymentMethod
    store_id: Annotated[str, Field(min_length=1, max_length=64, pattern=PrintableText)] | None = (
        None
    )
    order_ref: Annotated[str, Field(min_length=1, max_length=128, pattern=PrintableText)] | None = (
        None
    )
    metadata: Annotated[
        dict[
            Annotated[str, Field(min_length=1, max_length=METADATA_KEY_MAX, pattern=PrintableText)],
            Annotated[str, Field(max_length=METADATA_VALUE_MAX, pattern=PrintableText)],
        ],
        WithJsonSchema(_METADATA_SCHEMA),
    ] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > METADATA_MAX_PAIRS:
            raise ValueError(f"at most {METADATA_MAX_PAIRS} pairs")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"at most {METADATA_MAX_BYTES} bytes of keys and values in all")
        return value


class CreateRefund(_Request):
    """Refund part or all of a captured payment, in the payment's currency."""

    amount: RequestAmount = Field(
        description="Integer amount in minor units of the payment's currency, 1 to 10^12."
        + _INTEGER_AS_WRITTEN
    )
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=PrintableText)] | None = None


class CreateTopUp(_Request):
    """Put money into a user's wallet from outside kessai."""

    amount: RequestAmount = Field(
        description="Integer amount in minor units, 1 to 10^12." + _INTEGER_AS_WRITTEN
    )
    currency: Currency = "JPY"
    source: TopUpSource = Field(description="Where the money comes from.")
    reference: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[ -~]+$")] | None = (
        Field(None, description="The source's own reference (printable ASCII), e.g. a bank's.")
    )


class CreateUser(_Request):
    """Register a user."""

    user_id: UserId
    device_id: DeviceId | None = Field(
        None, description="The device the user registers from (as `X-Device-Id` on payments)."
    )
    referrer: UserId | None = Field(
        None, description="The user who referred this one; not the user itself."
    )

    @field_validator("referrer")
    @classmethod
    def _not_the_user(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value == info.data.get("user_id"):
            # A type of its own: no JSON Schema can say "not equal to another field", so the
            # schema tests tell this refusal from a schema's (``referrer_is_user``).
            raise PydanticCustomError("referrer_is_user", "must not be the user itself")
        return value


class PaymentOut(BaseModel):
    payment_id: uuid.UUID
    merchant_id: str
    user_id: str
    amount: int
    currency: str
    method: Literal["balance", "card"]
    store_id: str | None
    order_ref: str | None
    metadata: dict[str, str]
    status: Literal["captured", "partially_refunded", "refunded"]
    refunded_amount: int
    version: int
    created_at: datetime


class RefundOut(BaseModel):
    refund_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    refunded_amount: int = Field(description="Total refunded for the payment so far.")
    status: Literal["partially_refunded", "refunded"]
    reason: str | None
    version: int
    created_at: datetime


class TopUpOut(BaseModel):
    top_up_id: uuid.UUID
    user_id: str
    amount: int
    currency: str
    source: TopUpSource
    reference: str | None
    balance: int = Field(description="The wallet's balance after this top-up.")
    version: int = Field(description="The wallet's version after this top-up (1 for its first).")
    created_at: datetime


class UserOut(BaseModel):
    user_id: str
    registered_at: datetime = Field(description="When the registration was recorded.")
    event_id: uuid.UUID = Field(description="The id of its `UserRegistered` event.")
