"""``POST /v1/users``: registering a user, once.

The route builds the request's write command (``registration_command``) and hands it over to
be decided and recorded (``command_service/handlers.py``), exactly like a top-up. A user is
registered once: ``decide_batch`` answers ``409 user_exists`` to a registration of a user who
is registered (in the store, or earlier in the same batch), and ``user_registrations``' primary
key refuses the second of two registrations that raced in from other transactions or processes
(its transaction fails as a write conflict, is decided again, and then sees the first).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from command_service.handlers import Clock, Decision, IdSource, WriteCommand, WritePolicy, canonical
from command_service.routes.dependencies import (
    IDEMPOTENCY_KEY_DOC,
    WRITE_ERRORS,
    ResourcesDep,
    parse_idempotency_key,
    record,
    write_policy,
)
from command_service.schemas import CreateUser, UserOut
from kessai.auth import USERS_WRITE, needs
from kessai.errors import ErrorOut
from kessai.events import UserRegistered, UserRegisteredPayload
from kessai.ledger import PaymentState
from kessai.wallets import Wallet

router = APIRouter()

_REGISTRATION_ERRORS: dict[int | str, dict[str, object]] = {
    403: {"model": ErrorOut, "description": "`forbidden`: the key lacks `users:write`."},
    409: {
        "model": ErrorOut,
        "description": "`user_exists`: the user is registered already (by another request); "
        "`details` {`user_id`, `registered_at`}. Or the Idempotency-Key is in flight.",
    },
    422: {
        "model": ErrorOut,
        "description": "Invalid body (the field is named; `referrer` the user itself), or a "
        "key reused for another body.",
    },
}


@router.post(
    "/v1/users",
    status_code=201,
    response_model=UserOut,
    responses={**WRITE_ERRORS, **_REGISTRATION_ERRORS},
    operation_id="register_user",
    summary="Register a user",
    dependencies=[Depends(needs(USERS_WRITE))],
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC]},
)
async def register_user(request: Request, body: CreateUser, resources: ResourcesDep) -> Response:
    """Register `user_id` (appends `UserRegistered`). A user is registered once: registering
    them again is 409 `user_exists` and writes nothing. Repeating the request with the same
    Idempotency-Key and body returns the original response with `Idempotent-Replayed: true`."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    policy = write_policy(request, resources, key)
    return await record(resources, registration_command(policy=policy, command=body))


def registration_command(*, policy: WritePolicy, command: CreateUser) -> WriteCommand:
    """A registration: one ``UserRegistered`` (version 1 of the user's registration stream);
    ``409 user_exists`` if the user is registered (checked by ``decide_batch``)."""
    request: dict[str, Any] = {"operation": "register_user", **command.model_dump(mode="json")}

    def decide(
        _state: PaymentState | None, _wallet: Wallet | None, *, clock: Clock, ids: IdSource
    ) -> Decision:
        now = clock()
        event = UserRegistered(
            event_id=ids(),
            user_id=command.user_id,
            occurred_at=now,
            recorded_at=now,
            payload=UserRegisteredPayload(device_id=command.device_id, referrer=command.referrer),
        )
        body = UserOut(
            user_id=command.user_id, registered_at=now, event_id=event.event_id
        ).model_dump(mode="json")
        return 201, body, [event]

    return WriteCommand(
        policy, request, canonical(request), None, decide, registers=command.user_id
    )
