"""``POST /v1/payments/{payment_id}/refunds``: refund part or all of a payment.

The route builds the request's write command (``refund_command``: checked against the folded
state of the payment, inside the transaction that records it) and hands it over to be decided
and recorded (``command_service/handlers.py``).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from command_service.handlers import (
    Clock,
    Decision,
    IdSource,
    WriteCommand,
    WritePolicy,
    canonical,
)
from command_service.routes.dependencies import (
    IDEMPOTENCY_KEY_DOC,
    REFUND_LINK,
    WRITE_ERRORS,
    ResourcesDep,
    parse_idempotency_key,
    record,
    write_policy,
)
from command_service.schemas import CreateRefund, RefundOut
from kessai.auth import PAYMENTS_WRITE, needs
from kessai.errors import ApiError, ErrorOut
from kessai.events import (
    PaymentRefunded,
    PaymentRefundedPayload,
    WalletCredited,
    WalletCreditedPayload,
)
from kessai.ledger import PaymentState
from kessai.postings import refund_postings
from kessai.wallets import Wallet, credit

router = APIRouter()


@router.post(
    "/v1/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundOut,
    responses={
        **WRITE_ERRORS,
        **REFUND_LINK,
        404: {"model": ErrorOut, "description": "No such payment."},
    },
    operation_id="create_refund",
    summary="Refund part or all of a payment",
    dependencies=[Depends(needs(PAYMENTS_WRITE))],
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC]},
)
async def create_refund(
    request: Request,
    payment_id: Annotated[uuid.UUID, Path()],
    body: CreateRefund,
    resources: ResourcesDep,
) -> Response:
    """Refund `amount` of the payment. The total refunded never exceeds the captured amount,
    even under concurrent refunds: a refund that would is refused with
    409 `refund_exceeds_captured`. A refund of a `balance` payment puts the amount back in the
    user's wallet in the same transaction (its balance limit does not refuse a refund)."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    policy = write_policy(request, resources, key)
    return await record(
        resources, refund_command(policy=policy, payment_id=payment_id, command=body)
    )


def refund_command(
    *, policy: WritePolicy, payment_id: uuid.UUID, command: CreateRefund
) -> WriteCommand:
    """Refund part of a payment: one ``PaymentRefunded`` event at the next version of the
    payment's folded state, and for a balance payment a ``WalletCredited`` at the next version
    of the payer's wallet; 404 without a payment, 409 beyond what is left to refund."""
    request = {
        "operation": "refund_payment",
        "payment_id": str(payment_id),
        **command.model_dump(mode="json"),
    }

    def decide(
        state: PaymentState | None, wallet: Wallet | None, *, clock: Clock, ids: IdSource
    ) -> Decision:
        if state is None:
            raise ApiError(
                404,
                "payment_not_found",
                "No payment with this id.",
                {"payment_id": str(payment_id)},
            )
        if command.amount > state.refundable_amount:
            raise ApiError(
                409,
                "refund_exceeds_captured",
                f"A refund of {command.amount} would exceed what is left to refund "
                f"({state.refundable_amount} of {state.captured_amount} {state.currency}).",
                {
                    "captured": state.captured_amount,
                    "refunded": state.refunded_amount,
                    "requested": command.amount,
                },
            )
        now = clock()
        refunded_total = state.refunded_amount + command.amount
        event = PaymentRefunded(
            event_id=ids(),
            payment_id=payment_id,
            version=state.version + 1,
            merchant_id=state.merchant_id,
            occurred_at=now,
            recorded_at=now,
            # The reverse of the payment's route: back to the wallet or the acquirer.
            postings=refund_postings(
                state.method, state.user_id, state.merchant_id, command.amount
            ),
            payload=PaymentRefundedPayload(
                refund_id=ids(),
                amount=command.amount,
                currency=state.currency,
                refunded_amount=refunded_total,
                reason=command.reason,
            ),
        )
        body = RefundOut(
            refund_id=event.payload.refund_id,
            payment_id=payment_id,
            amount=command.amount,
            currency=state.currency,
            refunded_amount=refunded_total,
            status="refunded" if refunded_total == state.captured_amount else "partially_refunded",
            reason=command.reason,
            version=event.version,
            created_at=now,
        ).model_dump(mode="json")
        if wallet is None:
            return 201, body, [event]
        return 201, body, [event, _credited(wallet, state, event, ids)]

    return WriteCommand(policy, request, canonical(request), payment_id, decide, wallet_of=_payer)


def _credited(
    wallet: Wallet, state: PaymentState, refund: PaymentRefunded, ids: IdSource
) -> WalletCredited:
    """The wallet's side of a refund of a balance payment: the amount back."""
    p = refund.payload
    returned = credit(wallet, p.amount, p.currency)
    return WalletCredited(
        event_id=ids(),
        user_id=state.user_id,
        version=returned.version,
        occurred_at=refund.occurred_at,
        recorded_at=refund.recorded_at,
        payload=WalletCreditedPayload(
            payment_id=refund.payment_id,
            refund_id=p.refund_id,
            merchant_id=refund.merchant_id,
            amount=p.amount,
            currency=p.currency,
            balance_after=returned.balance_after,
        ),
    )


def _payer(state: PaymentState | None) -> str | None:
    """The wallet a refund puts money back in: its payment's payer's, for a balance payment."""
    return state.user_id if state is not None and state.method == "balance" else None
