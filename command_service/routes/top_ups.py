"""``POST /v1/users/{user_id}/top-ups``: money into a user's wallet from outside kessai.

The route builds the request's write command (``top_up_command``: checked against the wallet's
balance inside the transaction that records it) and hands it over to be decided and recorded
(``command_service/handlers.py``), exactly like a payment.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
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
from command_service.schemas import CreateTopUp, TopUpOut
from kessai.auth import WALLETS_WRITE, needs
from kessai.errors import ErrorOut
from kessai.events import TopUpReceived, TopUpReceivedPayload
from kessai.ledger import PaymentState
from kessai.postings import topup_account, transfer, user_account
from kessai.wallets import Wallet, top_up

router = APIRouter()

UserIdPath = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The user."),
]

_TOP_UP_ERRORS: dict[int | str, dict[str, object]] = {
    403: {"model": ErrorOut, "description": "`forbidden`: the key lacks `wallets:write`."},
    409: {
        "model": ErrorOut,
        "description": "`balance_limit_exceeded`: the top-up would take the wallet past its "
        "limit; `details` {`balance`, `requested`, `limit`, `headroom`, `currency`}. Or the "
        "Idempotency-Key is in flight, or the wallet changed concurrently too often.",
    },
    422: {
        "model": ErrorOut,
        "description": "Invalid body or user id; `currency_mismatch` (the wallet holds another "
        "currency, `details` {`wallet_currency`, `requested_currency`}); or a key reused for "
        "another body.",
    },
}


@router.post(
    "/v1/users/{user_id}/top-ups",
    status_code=201,
    response_model=TopUpOut,
    responses={**WRITE_ERRORS, **_TOP_UP_ERRORS},
    operation_id="create_top_up",
    summary="Top up a user's wallet",
    dependencies=[Depends(needs(WALLETS_WRITE))],
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC]},
)
async def create_top_up(
    request: Request, user_id: UserIdPath, body: CreateTopUp, resources: ResourcesDep
) -> Response:
    """Credit `amount` to the user's wallet (a wallet opens with its first top-up, whose
    currency it then holds). Past the wallet's balance limit (`KESSAI_WALLET_MAX_BALANCE`,
    default 1,000,000 in minor units) it is 409 `balance_limit_exceeded` and nothing is
    written. Repeating the request with the same Idempotency-Key and body returns the original
    response with `Idempotent-Replayed: true`."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    policy = write_policy(request, resources, key)
    limit = resources.settings.wallet_max_balance
    return await record(
        resources, top_up_command(policy=policy, user_id=user_id, command=body, limit=limit)
    )


def top_up_command(
    *, policy: WritePolicy, user_id: str, command: CreateTopUp, limit: int
) -> WriteCommand:
    """A top-up: one ``TopUpReceived`` at the wallet's next version, posting the amount from
    ``world:topup:<source>`` to the user's wallet; 409 past ``limit``."""
    request: dict[str, Any] = {
        "operation": "top_up",
        "user_id": user_id,
        **command.model_dump(mode="json"),
    }

    def decide(
        _state: PaymentState | None, wallet: Wallet | None, *, clock: Clock, ids: IdSource
    ) -> Decision:
        assert wallet is not None  # wallet_of names the user's
        movement = top_up(wallet, command.amount, command.currency, limit=limit)
        now = clock()
        event = TopUpReceived(
            event_id=ids(),
            user_id=user_id,
            version=movement.version,
            occurred_at=now,
            recorded_at=now,
            postings=transfer(topup_account(command.source), user_account(user_id), command.amount),
            payload=TopUpReceivedPayload(
                top_up_id=ids(),
                amount=command.amount,
                currency=command.currency,
                source=command.source,
                reference=command.reference,
                balance_after=movement.balance_after,
            ),
        )
        body = TopUpOut(
            top_up_id=event.payload.top_up_id,
            user_id=user_id,
            amount=command.amount,
            currency=command.currency,
            source=command.source,
            reference=command.reference,
            balance=movement.balance_after,
            version=movement.version,
            created_at=now,
        ).model_dump(mode="json")
        return 201, body, [event]

    return WriteCommand(
        policy, request, canonical(request), None, decide, wallet_of=lambda _state: user_id
    )
