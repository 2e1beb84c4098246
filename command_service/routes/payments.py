"""``POST /v1/payments``: capture a payment; a card payment is first authorized with the card
acquirer (``command_service/acquirer.py``) with no transaction held while it answers.

The route builds the request's write command (``capture_command``, or ``decline_command`` for a
card the acquirer declined) and hands it over to be decided and recorded
(``command_service/handlers.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from command_service.acquirer import (
    Acquirer,
    AcquirerUnavailable,
    Authorization,
    AuthorizationRequest,
    acquirer_key,
)
from command_service.handlers import (
    Clock,
    Decision,
    IdSource,
    WriteCommand,
    WritePolicy,
    canonical,
    stored_answer,
)
from command_service.routes.dependencies import (
    DEVICE_ID_DOC,
    IDEMPOTENCY_KEY_DOC,
    REFUND_LINK,
    WRITE_ERRORS,
    Resources,
    ResourcesDep,
    check_admission,
    claimed,
    parse_device_id,
    parse_idempotency_key,
    record,
    respond,
    write_policy,
)
from command_service.schemas import CreatePayment, PaymentOut
from kessai.auth import PAYMENTS_WRITE, needs
from kessai.errors import ApiError, ErrorOut
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    WalletDebited,
    WalletDebitedPayload,
)
from kessai.ledger import PaymentState
from kessai.postings import capture_postings
from kessai.wallets import Wallet, debit

router = APIRouter()

_PAYMENT_ERRORS: dict[int | str, dict[str, object]] = {
    402: {
        "model": ErrorOut,
        "description": "`insufficient_balance` (balance payments): the wallet does not cover "
        "the amount; `details` {`balance`, `requested`, `shortfall`, `currency`}. Nothing is "
        "written, the key included: top up and retry with the same key. "
        "`card_declined`: the acquirer declined the card; nothing was captured. "
        "Recorded: the same key and body get the same answer.",
    },
    422: {
        "model": ErrorOut,
        "description": "Invalid body; `currency_mismatch` (balance payments: the wallet holds "
        "another currency, `details` {`wallet_currency`, `requested_currency`}); or a key "
        "reused for another body.",
    },
    503: {
        "model": ErrorOut,
        "description": "`acquirer_unavailable` (card payments only; `details.reason`, "
        "`Retry-After`): no answer from the acquirer, nothing was captured. Or "
        "`write_store_unavailable`.",
    },
}


@router.post(
    "/v1/payments",
    status_code=201,
    response_model=PaymentOut,
    responses={**WRITE_ERRORS, **_PAYMENT_ERRORS, **REFUND_LINK},
    operation_id="create_payment",
    summary="Capture a payment",
    dependencies=[Depends(needs(PAYMENTS_WRITE)), Depends(check_admission)],
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC, DEVICE_ID_DOC]},
)
async def create_payment(
    request: Request, body: CreatePayment, resources: ResourcesDep
) -> Response:
    """Record a captured payment. Repeating the request with the same Idempotency-Key and
    body returns the original response with `Idempotent-Replayed: true`.

    A `balance` payment is taken from the user's wallet in the same transaction: a balance
    that does not cover it is 402 `insufficient_balance` (with the numbers in `details`), a
    wallet in another currency 422 `currency_mismatch`; neither writes anything.

    A `card` payment is first authorized with the card acquirer: a decline is
    402 `card_declined` (recorded and replayed like any answer); no answer is
    503 `acquirer_unavailable` and captures nothing (retry with the same key)."""
    headers = request.headers
    key = parse_idempotency_key(headers.get("idempotency-key"))
    device_id = parse_device_id(headers.get("x-device-id"))
    policy = write_policy(request, resources, key)
    if body.method == "card":
        return await _card_payment(resources, policy, body, device_id)
    return await record(
        resources, capture_command(policy=policy, command=body, device_id=device_id)
    )


async def _card_payment(
    resources: Resources, policy: WritePolicy, body: CreatePayment, device_id: str | None
) -> Response:
    """A card payment: the recorded answer if the key has one; otherwise the acquirer's
    authorization over HTTP, then the capture with its id (or the recorded decline).

    Only the two short database steps run in worker threads. The acquirer is awaited on the
    event loop with no transaction open and no thread or connection held, so a hanging
    acquirer cannot take what balance payments and refunds need."""
    # The request as the idempotency record holds it (the same whatever the acquirer says).
    asked = capture_command(policy=policy, command=body, device_id=device_id)
    engine = resources.engine
    with claimed(resources, policy):
        outcome = await resources.run(lambda: stored_answer(engine=engine, command=asked))
        if outcome is None:
            authorization = await _authorize(resources.acquirer, asked, body)
            answer = capture_command if authorization.approved else decline_command
            outcome = await resources.recorder.record(
                answer(
                    policy=policy,
                    command=body,
                    device_id=device_id,
                    authorization_id=authorization.authorization_id,
                ),
            )
    return respond(outcome)


async def _authorize(
    acquirer: Acquirer | None, command: WriteCommand, body: CreatePayment
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


# -- the commands ------------------------------------------------------------------------------


def _payment_request(command: CreatePayment, device_id: str | None) -> dict[str, Any]:
    return {
        "operation": "create_payment",
        "device_id": device_id,
        **command.model_dump(mode="json"),
    }


def capture_command(
    *,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str | None = None,
) -> WriteCommand:
    """A captured payment: one ``PaymentCaptured`` event, version 1, carrying the
    acquirer's ``authorization_id`` for a card payment that was authorized, and its postings:
    the payment's amount from the user's wallet (``balance``) or the acquirer (``card``) to the
    merchant. A balance payment also debits the wallet (``WalletDebited``, at the wallet's next
    version), if its balance covers the amount."""

    def decide(
        _state: PaymentState | None, wallet: Wallet | None, *, clock: Clock, ids: IdSource
    ) -> Decision:
        # Refused before anything is built: a payment the balance cannot cover writes nothing.
        taken = None if wallet is None else debit(wallet, command.amount, command.currency)
        now = clock()
        event = PaymentCaptured(
            event_id=ids(),
            payment_id=ids(),
            version=1,
            merchant_id=command.merchant_id,
            occurred_at=now,
            recorded_at=now,
            postings=capture_postings(
                command.method, command.user_id, command.merchant_id, command.amount
            ),
            payload=PaymentCapturedPayload(
                amount=command.amount,
                currency=command.currency,
                user_id=command.user_id,
                method=command.method,
                store_id=command.store_id,
                order_ref=command.order_ref,
                metadata=command.metadata,
                device_id=device_id,
                authorization_id=authorization_id,
            ),
        )
        body = PaymentOut(
            payment_id=event.payment_id,
            merchant_id=command.merchant_id,
            user_id=command.user_id,
            amount=command.amount,
            currency=command.currency,
            method=command.method,
            store_id=command.store_id,
            order_ref=command.order_ref,
            metadata=command.metadata,
            status="captured",
            refunded_amount=0,
            version=1,
            created_at=now,
        ).model_dump(mode="json")
        if taken is None:
            return 201, body, [event]
        debited = WalletDebited(
            event_id=ids(),
            user_id=command.user_id,
            version=taken.version,
            occurred_at=now,
            recorded_at=now,
            payload=WalletDebitedPayload(
                payment_id=event.payment_id,
                merchant_id=command.merchant_id,
                amount=command.amount,
                currency=command.currency,
                balance_after=taken.balance_after,
            ),
        )
        return 201, body, [event, debited]

    request = _payment_request(command, device_id)
    payer = command.user_id if command.method == "balance" else None
    return WriteCommand(
        policy, request, canonical(request), None, decide, wallet_of=lambda _state: payer
    )


def decline_command(
    *, policy: WritePolicy, command: CreatePayment, device_id: str | None, authorization_id: str
) -> WriteCommand:
    """The acquirer's decline of a card payment as the request's answer: ``402
    card_declined``, replayed for the same key, and no event (nothing was captured)."""
    body = {
        "error": {
            "code": "card_declined",
            "message": "The card issuer declined the payment; nothing was captured.",
            "details": {"authorization_id": authorization_id},
        }
    }

    def decide(
        _state: PaymentState | None, _wallet: Wallet | None, *, clock: Clock, ids: IdSource
    ) -> Decision:
        return 402, body, []

    request = _payment_request(command, device_id)
    return WriteCommand(policy, request, canonical(request), None, decide)
