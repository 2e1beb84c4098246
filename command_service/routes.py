"""Routes of the command API: parse, check the Idempotency-Key, hand off to a handler.

Handlers block on the database, so they run in worker threads behind a capacity limiter sized
to the connection pool (a bulkhead: a slow database queues requests here instead of exhausting
threads). Same-key requests that overlap within this process are refused at once with 409.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated

import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Header, Path, Request
from starlette.responses import Response

from command_service import handlers
from command_service.schemas import CreatePayment, CreateRefund, PaymentOut, RefundOut
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.observability import metrics_response

router = APIRouter()

ANONYMOUS_CLIENT = "anonymous"
"""Until API keys exist every caller is this one client; idempotency keys are scoped to it."""

_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
_DEVICE_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "Missing or malformed Idempotency-Key, bad JSON."},
    409: {"model": ErrorOut, "description": "Idempotency-Key in flight, or a conflict."},
    413: {"model": ErrorOut, "description": "Body over the size limit."},
    422: {"model": ErrorOut, "description": "Invalid body, or a key reused for another body."},
}


def _idempotency_key(value: str | None) -> str:
    if value is None:
        raise ApiError(
            400, "idempotency_key_missing", "The Idempotency-Key header is required on writes."
        )
    if not _KEY_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            "idempotency_key_invalid",
            "The Idempotency-Key must be 1-255 printable ASCII characters without spaces.",
        )
    return value


def _device_id(value: str | None) -> str | None:
    if value is not None and not _DEVICE_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            "device_id_invalid",
            "X-Device-Id must be 1-128 printable ASCII characters without spaces.",
        )
    return value


async def _run(request: Request, key: str, call: Callable[[], handlers.Outcome]) -> Response:
    state = request.app.state
    scope = (ANONYMOUS_CLIENT, key)
    if scope in state.in_flight:
        raise ApiError(
            409,
            "idempotency_key_in_flight",
            "A request with this Idempotency-Key is still being processed; retry later.",
            headers={"Retry-After": "1"},
        )
    state.in_flight.add(scope)
    try:
        outcome = await anyio.to_thread.run_sync(call, limiter=state.db_limiter)
    except sa.exc.OperationalError as exc:
        raise ApiError(
            503,
            "write_store_unavailable",
            "The write store is unavailable; retry later.",
            headers={"Retry-After": "1"},
        ) from exc
    finally:
        state.in_flight.discard(scope)
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(
        outcome.body, status_code=outcome.status, media_type="application/json", headers=headers
    )


def _policy(request: Request, key: str) -> handlers.WritePolicy:
    settings = request.app.state.settings
    return handlers.WritePolicy(
        client_id=ANONYMOUS_CLIENT,
        idempotency_key=key,
        retention=timedelta(hours=settings.idempotency_retention_hours),
        shards=settings.outbox_shards,
        max_attempts=settings.refund_max_attempts,
    )


@router.post(
    "/v1/payments",
    status_code=201,
    response_model=PaymentOut,
    responses=_ERRORS,
    summary="Capture a payment",
)
async def create_payment(
    request: Request,
    body: CreatePayment,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    x_device_id: Annotated[str | None, Header(alias="X-Device-Id")] = None,
) -> Response:
    """Record a captured payment. Repeating the request with the same Idempotency-Key and
    body returns the original response with `Idempotent-Replayed: true`."""
    key = _idempotency_key(idempotency_key)
    device_id = _device_id(x_device_id)
    engine = request.app.state.write_engine
    policy = _policy(request, key)
    return await _run(
        request,
        key,
        lambda: handlers.capture_payment(
            engine=engine, policy=policy, command=body, device_id=device_id
        ),
    )


@router.post(
    "/v1/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundOut,
    responses={**_ERRORS, 404: {"model": ErrorOut, "description": "No such payment."}},
    summary="Refund part or all of a payment",
)
async def create_refund(
    request: Request,
    payment_id: Annotated[uuid.UUID, Path()],
    body: CreateRefund,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Refund `amount` of the payment. The total refunded never exceeds the captured amount,
    even under concurrent refunds: a refund that would is refused with
    409 `refund_exceeds_captured`."""
    key = _idempotency_key(idempotency_key)
    engine = request.app.state.write_engine
    policy = _policy(request, key)
    return await _run(
        request,
        key,
        lambda: handlers.refund_payment(
            engine=engine, policy=policy, payment_id=payment_id, command=body
        ),
    )


@router.get("/healthz", summary="The process is alive")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="The write store answers", responses={503: {"model": ErrorOut}})
async def readyz(request: Request) -> Response:
    engine = request.app.state.write_engine

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        await anyio.to_thread.run_sync(ping, limiter=request.app.state.db_limiter)
    except sa.exc.SQLAlchemyError as exc:
        raise ApiError(503, "write_store_unavailable", "The write store does not answer.") from exc
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    return await anyio.to_thread.run_sync(metrics_response, registry)
