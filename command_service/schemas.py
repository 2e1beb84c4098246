"""API schemas of the command service (request bodies and responses), distinct from both the
table definitions and the event contract."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kessai.events import Amount, MerchantId, PaymentMethod, UserId
from kessai.money import is_known_currency

# Printable text without control characters: what a person or a receipt would show.
PrintableText = r"^[^\x00-\x1f\x7f]*$"
METADATA_MAX_PAIRS = 20
METADATA_MAX_BYTES = 2048


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class CreatePayment(_Request):
    """Capture a payment. Amounts are integers in the currency's minor unit."""

    merchant_id: MerchantId
    user_id: UserId
    amount: Amount = Field(description="Integer amount in minor units, 1 to 10^12.")
    currency: str = Field("JPY", description="ISO 4217 code; the amount is in its minor unit.")
    method: PaymentMethod
    store_id: Annotated[str, Field(min_length=1, max_length=64, pattern=PrintableText)] | None = (
        None
    )
    order_ref: Annotated[str, Field(min_length=1, max_length=128, pattern=PrintableText)] | None = (
        None
    )
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=64, pattern=PrintableText)],
        Annotated[str, Field(max_length=512, pattern=PrintableText)],
    ] = Field(default_factory=dict, description="Up to 20 string pairs, 2 KB in all.")

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if not is_known_currency(value):
            raise ValueError("must be an active ISO 4217 currency code in upper case, e.g. JPY")
        return value

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

    amount: Amount = Field(description="Integer amount in minor units of the payment's currency.")
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=PrintableText)] | None = None


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
