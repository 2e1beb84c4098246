"""``GET /v1/payments/{payment_id}``: one payment, with its refunds."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from kessai.auth import principal_of
from kessai.errors import ApiError, ErrorOut
from query_service import handlers
from query_service.routes.dependencies import DATA_ERRORS, ResourcesDep, data_response, freshness
from query_service.schemas import PaymentDetailOut

router = APIRouter()


@router.get(
    "/v1/payments/{payment_id}",
    response_model=PaymentDetailOut,
    responses={**DATA_ERRORS, 404: {"model": ErrorOut, "description": "`payment_not_found`."}},
    summary="One payment with its refunds",
    operation_id="get_payment",
)
async def get_payment(
    *, payment_id: Annotated[uuid.UUID, Path()], resources: ResourcesDep, request: Request
) -> Response:
    """The payment as the read side knows it, with its refunds (oldest first).

    404 `payment_not_found` also covers a payment captured moments ago that the projector has
    not reached yet (the freshness headers on the 404 say how far it has got), and a payment
    of a merchant the key does not read."""
    as_of = await resources.freshness.as_of()
    body = await resources.run(
        lambda: handlers.payment_detail(engine=resources.engine, payment_id=payment_id)
    )
    if body is None or not principal_of(request.state).reads_merchant(body["merchant_id"]):
        # Another merchant's payment is answered exactly as one that does not exist.
        _, headers = freshness(as_of)
        raise ApiError(
            404,
            "payment_not_found",
            "No such payment in the read model.",
            {"payment_id": str(payment_id)},
            headers=headers,
        )
    return data_response(body, as_of)
