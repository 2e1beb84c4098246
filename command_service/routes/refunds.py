"""``POST /v1/payments/{payment_id}/refunds``: refund part or all of a payment."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from command_service import handlers
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
from kessai.errors import ErrorOut

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
    409 `refund_exceeds_captured`."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    policy = write_policy(request, resources, key)
    return await record(
        resources, handlers.refund_command(policy=policy, payment_id=payment_id, command=body)
    )
