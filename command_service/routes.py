"""Routes of the command API: parse, authorize, check the Idempotency-Key, hand over the write.

A route builds the request's ``handlers.WriteCommand`` and hands it to ``handlers.Recorder``,
which decides and records it (``command_service/handlers.py`` owns the transaction); a route
opens none. Same-key requests that overlap within this process are refused here at once with
409. The routes reach what the app's lifespan opened through one typed dependency,
``ResourcesDep``.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from starlette.responses import Response

from command_service import handlers
from command_service.acquirer import (
    Acquirer,
    AcquirerUnavailable,
    Authorization,
    AuthorizationRequest,
    acquirer_key,
)
from command_service.admission import Admission, AdmissionPolicy, store_policy
from command_service.schemas import CreatePayment, CreateRefund, PaymentOut, RefundOut
from kessai.auth import ADMIN, PAYMENTS_WRITE, needs, principal_of
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.observability import metrics_response
from kessai.settings import Settings

router = APIRouter()
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Resources:
    """What the routes use, opened and closed by the app's lifespan."""

    settings: Settings
    engine: Engine
    """The write store."""
    limiter: anyio.CapacityLimiter
    """The database bulkhead: at most this many database calls in worker threads."""
    recorder: handlers.Recorder
    admission: Admission
    acquirer: Acquirer | None
    """The card acquirer's client; ``None`` when none is configured."""
    registry: CollectorRegistry
    in_flight: set[tuple[str, str]] = field(default_factory=set)
    """The (API key, Idempotency-Key) pairs this process is handling now."""

    async def run(self, call: Callable[[], _T]) -> _T:
        """A blocking database call in a worker thread, within the bulkhead; 503 if the write
        store cannot be reached."""
        return await handlers.in_worker(self.limiter, call)


# A coroutine although it awaits nothing: FastAPI runs a plain function dependency in a
# worker thread, a thread hop per request.
async def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(_resources)]

_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
_DEVICE_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "Missing or malformed Idempotency-Key, bad JSON."},
    401: {"model": ErrorOut, "description": "`unauthorized`: no valid API key."},
    403: {"model": ErrorOut, "description": "`forbidden`: the key lacks `payments:write`."},
    429: {"model": ErrorOut, "description": "`rate_limited`: see `Retry-After`."},
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


# The write routes read their headers from the request rather than through FastAPI's
# ``Header()`` parameters: those cost more per request than the rest of the route's own work
# (measured with py-spy under ``python -m bench.writes``). They are documented here instead.
_IDEMPOTENCY_KEY_DOC: dict[str, object] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Unique per intended write, 1-255 printable ASCII characters without "
    "spaces. The same key and body replay the recorded answer; missing or malformed: 400.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[!-~]+$"},
}
_DEVICE_ID_DOC: dict[str, object] = {
    "name": "X-Device-Id",
    "in": "header",
    "required": False,
    "description": "The payer's device, for admission control; 1-128 printable ASCII "
    "characters without spaces.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[!-~]+$"},
}


async def _admission(request: Request, resources: ResourcesDep) -> None:
    """Device-group admission control (``command_service/admission.py``), when it is on."""
    await resources.admission.check(request, _device_id(request.headers.get("x-device-id")))


@contextlib.contextmanager
def _claimed(resources: Resources, policy: handlers.WritePolicy) -> Iterator[None]:
    """This process handles the (API key, Idempotency-Key) pair alone while the block runs; a
    second request with the same pair meanwhile is refused at once."""
    in_flight = resources.in_flight
    scope = (policy.client_id, policy.idempotency_key)
    if scope in in_flight:
        raise ApiError(
            409,
            "idempotency_key_in_flight",
            "A request with this Idempotency-Key is still being processed; retry later.",
            headers={"Retry-After": "1"},
        )
    in_flight.add(scope)
    try:
        yield
    finally:
        in_flight.discard(scope)


def _respond(outcome: handlers.Outcome) -> Response:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(
        outcome.body, status_code=outcome.status, media_type="application/json", headers=headers
    )


async def _record(resources: Resources, command: handlers.WriteCommand) -> Response:
    with _claimed(resources, command.policy):
        outcome = await resources.recorder.record(command)
    return _respond(outcome)


def _policy(request: Request, resources: Resources, key: str) -> handlers.WritePolicy:
    settings = resources.settings
    return handlers.WritePolicy(
        # Idempotency keys are scoped to the API key: two backends never collide.
        client_id=principal_of(request.state).key_id,
        idempotency_key=key,
        retention=timedelta(hours=settings.idempotency_retention_hours),
        shards=settings.outbox_shards,
        max_attempts=settings.refund_max_attempts,
    )


_CARD_ERRORS: dict[int | str, dict[str, object]] = {
    402: {
        "model": ErrorOut,
        "description": "`card_declined`: the acquirer declined the card; nothing was captured. "
        "Recorded: the same key and body get the same answer.",
    },
    503: {
        "model": ErrorOut,
        "description": "`acquirer_unavailable` (card payments only; `details.reason`, "
        "`Retry-After`): no answer from the acquirer, nothing was captured. Or "
        "`write_store_unavailable`.",
    },
}


_REFUND_LINK: dict[int | str, dict[str, object]] = {
    201: {
        "links": {
            "RefundThePayment": {
                "operationId": "create_refund",
                "parameters": {"path.payment_id": "$response.body#/payment_id"},
                "description": "Refund (part of) the payment.",
            }
        }
    }
}
"""For clients and the stateful tests: a payment (or a refund) leads to its payment's refunds."""


@router.post(
    "/v1/payments",
    status_code=201,
    response_model=PaymentOut,
    responses={**_ERRORS, **_CARD_ERRORS, **_REFUND_LINK},
    operation_id="create_payment",
    summary="Capture a payment",
    dependencies=[Depends(needs(PAYMENTS_WRITE)), Depends(_admission)],
    openapi_extra={"parameters": [_IDEMPOTENCY_KEY_DOC, _DEVICE_ID_DOC]},
)
async def create_payment(
    request: Request, body: CreatePayment, resources: ResourcesDep
) -> Response:
    """Record a captured payment. Repeating the request with the same Idempotency-Key and
    body returns the original response with `Idempotent-Replayed: true`.

    A `card` payment is first authorized with the card acquirer: a decline is
    402 `card_declined` (recorded and replayed like any answer); no answer is
    503 `acquirer_unavailable` and captures nothing (retry with the same key)."""
    headers = request.headers
    key = _idempotency_key(headers.get("idempotency-key"))
    device_id = _device_id(headers.get("x-device-id"))
    policy = _policy(request, resources, key)
    if body.method == "card":
        return await _card_payment(resources, policy, body, device_id)
    return await _record(
        resources, handlers.capture_command(policy=policy, command=body, device_id=device_id)
    )


async def _card_payment(
    resources: Resources, policy: handlers.WritePolicy, body: CreatePayment, device_id: str | None
) -> Response:
    """A card payment: the recorded answer if the key has one; otherwise the acquirer's
    authorization over HTTP, then the capture with its id (or the recorded decline).

    Only the two short database steps run in worker threads. The acquirer is awaited on the
    event loop with no transaction open and no thread or connection held, so a hanging
    acquirer cannot take what balance payments and refunds need."""
    # The request as the idempotency record holds it (the same whatever the acquirer says).
    asked = handlers.capture_command(policy=policy, command=body, device_id=device_id)
    engine = resources.engine
    with _claimed(resources, policy):
        outcome = await resources.run(lambda: handlers.stored_answer(engine=engine, command=asked))
        if outcome is None:
            authorization = await _authorize(resources.acquirer, asked, body)
            record = (
                handlers.capture_command if authorization.approved else handlers.decline_command
            )
            outcome = await resources.recorder.record(
                record(
                    policy=policy,
                    command=body,
                    device_id=device_id,
                    authorization_id=authorization.authorization_id,
                ),
            )
    return _respond(outcome)


async def _authorize(
    acquirer: Acquirer | None, command: handlers.WriteCommand, body: CreatePayment
) -> Authorization:
    """The acquirer's approval or decline; 503 ``acquirer_unavailable`` without one."""
    if acquirer is None:
        raise ApiError(
            503,
            "acquirer_unavailable",
            "Card payments are unavailable: no card acquirer is configured.",
            {"reason": "not_configured"},
        )
    request = AuthorizationRequest(
        idempotency_key=acquirer_key(
            command.policy.client_id, command.policy.idempotency_key, command.request_json
        ),
        amount=body.amount,
        currency=body.currency,
        merchant_id=body.merchant_id,
        reference=body.order_ref,
    )
    try:
        return await acquirer.authorize(request)
    except AcquirerUnavailable as exc:
        raise ApiError(
            503,
            "acquirer_unavailable",
            str(exc),
            {"reason": exc.reason},
            headers={"Retry-After": str(exc.retry_after)},
        ) from exc


@router.post(
    "/v1/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundOut,
    responses={
        **_ERRORS,
        **_REFUND_LINK,
        404: {"model": ErrorOut, "description": "No such payment."},
    },
    operation_id="create_refund",
    summary="Refund part or all of a payment",
    dependencies=[Depends(needs(PAYMENTS_WRITE))],
    openapi_extra={"parameters": [_IDEMPOTENCY_KEY_DOC]},
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
    key = _idempotency_key(request.headers.get("idempotency-key"))
    policy = _policy(request, resources, key)
    return await _record(
        resources, handlers.refund_command(policy=policy, payment_id=payment_id, command=body)
    )


@router.get(
    "/v1/admin/admission",
    response_model=AdmissionPolicy,
    responses={401: _ERRORS[401], 403: {"model": ErrorOut, "description": "Not `admin`."}},
    summary="Admission control as it applies now",
    dependencies=[Depends(needs(ADMIN))],
)
async def get_admission(resources: ResourcesDep) -> Response:
    """The policy this process applies (every process re-reads it each second)."""
    return JSONResponse((await resources.admission.policy()).model_dump())


@router.put(
    "/v1/admin/admission",
    response_model=AdmissionPolicy,
    responses={
        401: _ERRORS[401],
        403: {"model": ErrorOut, "description": "Not `admin`."},
        422: _ERRORS[422],
    },
    summary="Change admission control live",
    dependencies=[Depends(needs(ADMIN))],
)
async def put_admission(
    request: Request, body: AdmissionPolicy, resources: ResourcesDep
) -> Response:
    """Turn device-group admission on or off, or change its share of devices, its window or
    what happens to requests without `X-Device-Id`. Every command API process applies it
    within a second; it outlives restarts (it is stored in the write store)."""
    updated_by = principal_of(request.state).key_id
    engine = resources.engine
    await resources.run(lambda: store_policy(engine, body, updated_by))
    resources.admission.applied(body)
    return JSONResponse(body.model_dump())


@router.get("/healthz", summary="The process is alive")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="The write store answers", responses={503: {"model": ErrorOut}})
async def readyz(resources: ResourcesDep) -> Response:
    engine = resources.engine

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        await anyio.to_thread.run_sync(ping, limiter=resources.limiter)
    except sa.exc.SQLAlchemyError as exc:
        raise ApiError(503, "write_store_unavailable", "The write store does not answer.") from exc
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(resources: ResourcesDep) -> Response:
    return await anyio.to_thread.run_sync(metrics_response, resources.registry)
