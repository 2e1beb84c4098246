"""Routes of the command API: parse, check the Idempotency-Key, hand off the write.

A write is a ``handlers.WriteCommand``, recorded with the writes of concurrent requests by the
group committer (``command_service/batching.py``), or alone with group commit off (or when its
batch failed as a whole). Database work blocks, so it runs in worker threads behind a capacity
limiter sized to the connection pool (a bulkhead: a slow database queues requests here instead
of exhausting threads). Same-key requests that overlap within this process are refused at once
with 409.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Annotated, TypeVar

import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Request
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
from command_service.batching import GroupCommitter
from command_service.schemas import CreatePayment, CreateRefund, PaymentOut, RefundOut
from kessai.auth import ADMIN, PAYMENTS_WRITE, needs, principal_of
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.observability import metrics_response

router = APIRouter()

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


async def _admission(request: Request) -> None:
    """Device-group admission control (``command_service/admission.py``), when it is on."""
    admission: Admission = request.app.state.admission
    await admission.check(request, _device_id(request.headers.get("x-device-id")))


@contextlib.contextmanager
def _claimed(request: Request, policy: handlers.WritePolicy) -> Iterator[None]:
    """This process handles the (API key, Idempotency-Key) pair alone while the block runs; a
    second request with the same pair meanwhile is refused at once."""
    in_flight: set[tuple[str, str]] = request.app.state.in_flight
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


async def _run(request: Request, command: handlers.WriteCommand) -> Response:
    with _claimed(request, command.policy):
        outcome = await _record(request, command)
    return _respond(outcome)


async def _record(request: Request, command: handlers.WriteCommand) -> handlers.Outcome:
    """Record ``command``: in a group commit with concurrent requests when group commit is on
    (``command_service/batching.py``), else (or when its batch failed as a whole) in a
    transaction of its own."""
    committer: GroupCommitter | None = request.app.state.group_committer
    if committer is not None:
        outcome = await committer.submit(command)
        if outcome is not None:
            return outcome
    engine = request.app.state.write_engine
    return await _in_worker(request, lambda: handlers.run_alone(engine=engine, command=command))


def _policy(request: Request, key: str) -> handlers.WritePolicy:
    settings = request.app.state.settings
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
async def create_payment(request: Request, body: CreatePayment) -> Response:
    """Record a captured payment. Repeating the request with the same Idempotency-Key and
    body returns the original response with `Idempotent-Replayed: true`.

    A `card` payment is first authorized with the card acquirer: a decline is
    402 `card_declined` (recorded and replayed like any answer); no answer is
    503 `acquirer_unavailable` and captures nothing (retry with the same key)."""
    headers = request.headers
    key = _idempotency_key(headers.get("idempotency-key"))
    device_id = _device_id(headers.get("x-device-id"))
    policy = _policy(request, key)
    if body.method == "card":
        return await _card_payment(request, policy, body, device_id)
    return await _run(
        request, handlers.capture_command(policy=policy, command=body, device_id=device_id)
    )


_T = TypeVar("_T")


async def _card_payment(
    request: Request, policy: handlers.WritePolicy, body: CreatePayment, device_id: str | None
) -> Response:
    """A card payment: the recorded answer if the key has one; otherwise the acquirer's
    authorization over HTTP, then the capture with its id (or the recorded decline).

    Only the two short database steps run in worker threads. The acquirer is awaited on the
    event loop with no transaction open and no thread or connection held, so a hanging
    acquirer cannot take what balance payments and refunds need."""
    state = request.app.state
    engine = state.write_engine
    with _claimed(request, policy):
        outcome = await _in_worker(
            request,
            lambda: handlers.stored_payment_answer(
                engine=engine, policy=policy, command=body, device_id=device_id
            ),
        )
        if outcome is None:
            authorization = await _authorize(state.acquirer, policy, body, device_id)
            record = (
                handlers.capture_command if authorization.approved else handlers.decline_command
            )
            outcome = await _record(
                request,
                record(
                    policy=policy,
                    command=body,
                    device_id=device_id,
                    authorization_id=authorization.authorization_id,
                ),
            )
    return _respond(outcome)


async def _in_worker(request: Request, call: Callable[[], _T]) -> _T:
    """``call`` in a worker thread behind the database bulkhead; an unreachable store is 503."""
    try:
        return await anyio.to_thread.run_sync(call, limiter=request.app.state.db_limiter)
    except sa.exc.OperationalError as exc:
        raise ApiError(
            503,
            "write_store_unavailable",
            "The write store is unavailable; retry later.",
            headers={"Retry-After": "1"},
        ) from exc


async def _authorize(
    acquirer: Acquirer | None,
    policy: handlers.WritePolicy,
    body: CreatePayment,
    device_id: str | None,
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
            policy.client_id,
            policy.idempotency_key,
            handlers.payment_request_json(body, device_id),
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
    request: Request, payment_id: Annotated[uuid.UUID, Path()], body: CreateRefund
) -> Response:
    """Refund `amount` of the payment. The total refunded never exceeds the captured amount,
    even under concurrent refunds: a refund that would is refused with
    409 `refund_exceeds_captured`."""
    key = _idempotency_key(request.headers.get("idempotency-key"))
    policy = _policy(request, key)
    return await _run(
        request, handlers.refund_command(policy=policy, payment_id=payment_id, command=body)
    )


@router.get(
    "/v1/admin/admission",
    response_model=AdmissionPolicy,
    responses={401: _ERRORS[401], 403: {"model": ErrorOut, "description": "Not `admin`."}},
    summary="Admission control as it applies now",
    dependencies=[Depends(needs(ADMIN))],
)
async def get_admission(request: Request) -> Response:
    """The policy this process applies (every process re-reads it each second)."""
    admission: Admission = request.app.state.admission
    return JSONResponse((await admission.policy()).model_dump())


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
async def put_admission(request: Request, body: AdmissionPolicy) -> Response:
    """Turn device-group admission on or off, or change its share of devices, its window or
    what happens to requests without `X-Device-Id`. Every command API process applies it
    within a second; it outlives restarts (it is stored in the write store)."""
    admission: Admission = request.app.state.admission
    updated_by = principal_of(request.state).key_id
    await _in_worker(
        request, lambda: store_policy(request.app.state.write_engine, body, updated_by)
    )
    admission.applied(body)
    return JSONResponse(body.model_dump())


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
