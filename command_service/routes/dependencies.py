"""What the command API's routes share: their resources, the Idempotency-Key and X-Device-Id
headers (parsed, and documented), the documented errors, and how a write command is handed over.

The routes reach what the app's lifespan opened through one typed dependency, ``ResourcesDep``.
``record`` hands a write command to ``handlers.Recorder``, which decides and records it
(``command_service/handlers.py`` owns the transaction); a route opens none. Same-key requests
that overlap within this process are refused here at once with 409 (``claimed``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from starlette.responses import Response

from command_service import handlers
from command_service.acquirer import Acquirer
from command_service.admission import Admission
from kessai.auth import principal_of
from kessai.errors import ApiError, ErrorOut
from kessai.settings import Settings

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

WRITE_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "Missing or malformed Idempotency-Key, bad JSON."},
    401: {"model": ErrorOut, "description": "`unauthorized`: no valid API key."},
    403: {"model": ErrorOut, "description": "`forbidden`: the key lacks `payments:write`."},
    429: {"model": ErrorOut, "description": "`rate_limited`: see `Retry-After`."},
    409: {"model": ErrorOut, "description": "Idempotency-Key in flight, or a conflict."},
    413: {"model": ErrorOut, "description": "Body over the size limit."},
    422: {"model": ErrorOut, "description": "Invalid body, or a key reused for another body."},
}

REFUND_LINK: dict[int | str, dict[str, object]] = {
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


def parse_idempotency_key(value: str | None) -> str:
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


def parse_device_id(value: str | None) -> str | None:
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
IDEMPOTENCY_KEY_DOC: dict[str, object] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Unique per intended write, 1-255 printable ASCII characters without "
    "spaces. The same key and body replay the recorded answer; missing or malformed: 400.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[!-~]+$"},
}
DEVICE_ID_DOC: dict[str, object] = {
    "name": "X-Device-Id",
    "in": "header",
    "required": False,
    "description": "The payer's device, for admission control; 1-128 printable ASCII "
    "characters without spaces.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[!-~]+$"},
}


async def check_admission(request: Request, resources: ResourcesDep) -> None:
    """Device-group admission control (``command_service/admission.py``), when it is on."""
    await resources.admission.check(request, parse_device_id(request.headers.get("x-device-id")))


def write_policy(request: Request, resources: Resources, key: str) -> handlers.WritePolicy:
    settings = resources.settings
    return handlers.WritePolicy(
        # Idempotency keys are scoped to the API key: two backends never collide.
        client_id=principal_of(request.state).key_id,
        idempotency_key=key,
        retention=timedelta(hours=settings.idempotency_retention_hours),
        shards=settings.outbox_shards,
        max_attempts=settings.refund_max_attempts,
    )


@contextlib.contextmanager
def claimed(resources: Resources, policy: handlers.WritePolicy) -> Iterator[None]:
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


def respond(outcome: handlers.Outcome) -> Response:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(
        outcome.body, status_code=outcome.status, media_type="application/json", headers=headers
    )


async def record(resources: Resources, command: handlers.WriteCommand) -> Response:
    """The response to ``command``, recorded (or replayed) while this process holds its key."""
    with claimed(resources, command.policy):
        outcome = await resources.recorder.record(command)
    return respond(outcome)
