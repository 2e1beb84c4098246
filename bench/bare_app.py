"""The baseline of ``bench/writes.py``: a bare FastAPI POST endpoint with the command API's
body model (``CreatePayment``), no database, no authentication. Served like the real API:
``uvicorn bench.bare_app:create_app --factory``."""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Header
from starlette.responses import Response

from command_service.schemas import CreatePayment, CreateRefund


def create_app() -> FastAPI:
    app = FastAPI(title="bare POST baseline")

    @app.post("/v1/payments", status_code=201)
    async def create_payment(
        body: CreatePayment,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Response:
        content = (
            f'{{"payment_id":"{uuid.uuid4()}","merchant_id":"{body.merchant_id}",'
            f'"amount":{body.amount},"status":"captured"}}'
        )
        return Response(content, status_code=201, media_type="application/json")

    @app.post("/v1/payments/{payment_id}/refunds", status_code=201)
    async def create_refund(
        payment_id: uuid.UUID,
        body: CreateRefund,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Response:
        content = (
            f'{{"refund_id":"{uuid.uuid4()}","payment_id":"{payment_id}",'
            f'"amount":{body.amount},"status":"partially_refunded"}}'
        )
        return Response(content, status_code=201, media_type="application/json")

    return app
