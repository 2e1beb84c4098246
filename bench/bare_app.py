"""The baselines of ``bench/writes.py`` and ``bench/queries.py``: bare FastAPI endpoints, no
database, no authentication. Served like the real APIs:
``uvicorn bench.bare_app:create_app --factory``.

- ``POST /v1/payments`` (and refunds): the command API's body models (``CreatePayment``);
- ``GET /v1/bare/merchants/{merchant_id}?items=N``: a JSON body shaped like a page of the query
  API's payment list with ``items`` payments (0-500; 50 is the size of a default page, a few
  make a body the size of a summary), built and serialized per request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
from fastapi import FastAPI, Header, Path, Query
from starlette.responses import Response

from command_service.schemas import CreatePayment, CreateRefund
from kessai.runtime import freeze_startup_heap


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

    @app.get("/v1/bare/merchants/{merchant_id}")
    async def bare_page(
        merchant_id: str = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"),
        items: int = Query(50, ge=0, le=500),
    ) -> Response:
        now = datetime.now(UTC)
        body: dict[str, object] = {
            "items": [
                {
                    "payment_id": str(uuid.uuid4()),
                    "merchant_id": merchant_id,
                    "user_id": f"u{n}",
                    "store_id": None,
                    "order_ref": f"order-{n}",
                    "method": "balance",
                    "currency": "JPY",
                    "captured_amount": 1200 + n,
                    "refunded_amount": 0,
                    "status": "captured",
                    "version": 1,
                    "metadata": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for n in range(items)
            ],
            "next_cursor": None,
            "as_of": now,
            "lag_seconds": 0.0,
        }
        return Response(orjson.dumps(body), media_type="application/json")

    freeze_startup_heap()  # served like the real APIs (kessai.runtime)
    return app
