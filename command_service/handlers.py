"""The command handlers: each runs one write-store transaction that it begins and commits.

Each request is a ``WriteCommand`` (``capture_command``, ``decline_command``,
``refund_command``): its normalized request and a pure ``decide`` step. ``run_alone`` records
one command in a transaction of its own; the group commit (``command_service/batching.py``)
records many in one, deciding each with the same ``decide``.

A handler either commits everything (events, outbox rows, the idempotency record) or nothing.
Write conflicts (a concurrent refund took the next version; another process finished the same
idempotency key first; a deadlock) roll the transaction back and run it again from the top,
so the retry sees the winner's commit. Business refusals (``ApiError``) roll back and are not
recorded: a refused request changes nothing, its idempotency key included.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from command_service import repository
from command_service.schemas import CreatePayment, CreateRefund, PaymentOut, RefundOut
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
)
from kessai.ids import new_id
from kessai.ledger import PaymentState, fold

_MYSQL_RETRYABLE = {1205, 1213}  # lock wait timeout, deadlock


def is_write_conflict(exc: BaseException) -> bool:
    """A failure that another transaction caused and a fresh attempt can resolve."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        orig = exc.orig
        code = orig.args[0] if orig is not None and orig.args else None
        return code in _MYSQL_RETRYABLE or "database is locked" in str(orig)
    return False


@dataclass(frozen=True, slots=True)
class WritePolicy:
    client_id: str
    idempotency_key: str
    retention: timedelta
    shards: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes
    replayed: bool


Decision = tuple[int, dict[str, Any], list[PaymentCaptured | PaymentRefunded]]
"""The answer to a request (status, body) and the events it appends."""

Work = Callable[[sa.Connection], Decision]


def _canonical(request: dict[str, Any]) -> str:
    """The normalized request as stored with its idempotency record and compared on reuse."""
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS).decode()


def _run_idempotent(
    *, engine: Engine, policy: WritePolicy, request: dict[str, Any], work: Work
) -> Outcome:
    """Run ``work`` in a transaction that also records its answer under the idempotency key.
    ``work`` may return no events: the answer alone is then recorded (a card decline)."""
    request_json = _canonical(request)

    def attempt() -> Outcome:
        now = utcnow()
        with engine.begin() as conn:
            record = repository.get_idempotency(conn, policy.client_id, policy.idempotency_key)
            if record is not None and record.expires_at > now:
                if record.request == request_json:
                    return Outcome(record.response_status, record.response_body.encode(), True)
                raise _key_reused(orjson.loads(record.request), request)
            if record is not None:
                repository.delete_idempotency(conn, policy.client_id, policy.idempotency_key)
            status, body, new_events = work(conn)
            repository.append_events(conn, new_events, shards=policy.shards)
            body_json = orjson.dumps(body).decode()
            repository.save_idempotency(
                conn,
                client_id=policy.client_id,
                key=policy.idempotency_key,
                request=request_json,
                response_status=status,
                response_body=body_json,
                created_at=now,
                expires_at=now + policy.retention,
            )
        return Outcome(status, body_json.encode(), False)

    retrying = Retrying(
        retry=retry_if_exception(is_write_conflict),
        stop=stop_after_attempt(policy.max_attempts),
        wait=wait_random_exponential(multiplier=0.002, max=0.05),
    )
    try:
        return retrying(attempt)
    except RetryError as exc:
        raise ApiError(
            409,
            "concurrent_modification",
            "The payment changed concurrently too many times; retry the request.",
            {"attempts": policy.max_attempts},
        ) from exc


def recorded_answer(
    record: repository.IdempotencyRecord | None, command: WriteCommand, now: datetime
) -> Outcome | None:
    """The stored answer that a live record under the command's key gives it (a replay), or
    ``None`` without one; a record of another request is ``422 idempotency_key_reused``."""
    if record is None or record.expires_at <= now:
        return None
    if record.request == command.request_json:
        return Outcome(record.response_status, record.response_body.encode(), True)
    raise _key_reused(orjson.loads(record.request), command.request)


def _key_reused(original: dict[str, Any], request: dict[str, Any]) -> ApiError:
    fields = sorted(
        k for k in original.keys() | request.keys() if original.get(k) != request.get(k)
    )
    return ApiError(
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used for a different request: " + ", ".join(fields) + " differ.",
        {"fields": fields},
    )


def _payment_request(command: CreatePayment, device_id: str | None) -> dict[str, Any]:
    return {
        "operation": "create_payment",
        "device_id": device_id,
        **command.model_dump(mode="json"),
    }


def payment_request_json(command: CreatePayment, device_id: str | None) -> str:
    """The normalized form of a payment request: equal for requests that are the same."""
    return _canonical(_payment_request(command, device_id))


def stored_payment_answer(
    *, engine: Engine, policy: WritePolicy, command: CreatePayment, device_id: str | None
) -> Outcome | None:
    """The recorded answer to this payment request under its idempotency key, if any.

    Read before a card payment calls the acquirer, in a short read of its own (no transaction
    is held across the call): a completed request is replayed without a second authorization,
    a key used for another request is ``422 idempotency_key_reused``. ``None``: not answered
    yet (or expired); ``capture_payment`` checks again in its own transaction."""
    request = _payment_request(command, device_id)
    with engine.connect() as conn:
        record = repository.get_idempotency(conn, policy.client_id, policy.idempotency_key)
    if record is None or record.expires_at <= utcnow():
        return None
    if record.request != _canonical(request):
        raise _key_reused(orjson.loads(record.request), request)
    return Outcome(record.response_status, record.response_body.encode(), True)


@dataclass(frozen=True, slots=True)
class WriteCommand:
    """One write request, ready to be decided against the state of the payment it touches.

    ``decide`` touches no database: given the folded state of ``payment_id`` (``None`` for a
    new payment, or a refund of a payment that does not exist), it returns the answer and the
    events to append, or raises ``ApiError`` for a refusal. The single-request transaction
    (``run_alone``) and the group commit (``command_service/batching.py``) both use it, so a
    request is decided the same way whichever path records it."""

    policy: WritePolicy
    request: dict[str, Any]
    request_json: str
    payment_id: uuid.UUID | None
    decide: Callable[[PaymentState | None], Decision]


def run_alone(*, engine: Engine, command: WriteCommand) -> Outcome:
    """Record ``command`` in a transaction of its own (with the write-conflict retries)."""
    payment_id = command.payment_id

    def work(conn: sa.Connection) -> Decision:
        state = (
            None if payment_id is None else fold(repository.load_payment_events(conn, payment_id))
        )
        return command.decide(state)

    return _run_idempotent(engine=engine, policy=command.policy, request=command.request, work=work)


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

    def decide(_state: PaymentState | None) -> Decision:
        return 402, body, []

    request = _payment_request(command, device_id)
    return WriteCommand(policy, request, _canonical(request), None, decide)


def decline_payment(
    *,
    engine: Engine,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str,
) -> Outcome:
    """Record the acquirer's decline of a card payment (``decline_command``)."""
    return run_alone(
        engine=engine,
        command=decline_command(
            policy=policy, command=command, device_id=device_id, authorization_id=authorization_id
        ),
    )


def capture_command(
    *,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str | None = None,
) -> WriteCommand:
    """A captured payment: one ``PaymentCaptured`` event, version 1, carrying the
    acquirer's ``authorization_id`` for a card payment that was authorized."""

    def decide(_state: PaymentState | None) -> Decision:
        now = utcnow()
        event = PaymentCaptured(
            event_id=new_id(),
            payment_id=new_id(),
            version=1,
            merchant_id=command.merchant_id,
            occurred_at=now,
            recorded_at=now,
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
        return 201, body, [event]

    request = _payment_request(command, device_id)
    return WriteCommand(policy, request, _canonical(request), None, decide)


def capture_payment(
    *,
    engine: Engine,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str | None = None,
) -> Outcome:
    """Record a captured payment (``capture_command``) in a transaction of its own."""
    return run_alone(
        engine=engine,
        command=capture_command(
            policy=policy, command=command, device_id=device_id, authorization_id=authorization_id
        ),
    )


def refund_command(
    *, policy: WritePolicy, payment_id: uuid.UUID, command: CreateRefund
) -> WriteCommand:
    """Refund part of a payment: one ``PaymentRefunded`` event at the next version of the
    payment's folded state; 404 without a payment, 409 beyond what is left to refund."""
    request = {
        "operation": "refund_payment",
        "payment_id": str(payment_id),
        **command.model_dump(mode="json"),
    }

    def decide(state: PaymentState | None) -> Decision:
        if state is None:
            raise ApiError(
                404,
                "payment_not_found",
                "No payment with this id.",
                {"payment_id": str(payment_id)},
            )
        if command.amount > state.refundable_amount:
            raise ApiError(
                409,
                "refund_exceeds_captured",
                f"A refund of {command.amount} would exceed what is left to refund "
                f"({state.refundable_amount} of {state.captured_amount} {state.currency}).",
                {
                    "captured": state.captured_amount,
                    "refunded": state.refunded_amount,
                    "requested": command.amount,
                },
            )
        now = utcnow()
        refunded_total = state.refunded_amount + command.amount
        event = PaymentRefunded(
            event_id=new_id(),
            payment_id=payment_id,
            version=state.version + 1,
            merchant_id=state.merchant_id,
            occurred_at=now,
            recorded_at=now,
            payload=PaymentRefundedPayload(
                refund_id=new_id(),
                amount=command.amount,
                currency=state.currency,
                refunded_amount=refunded_total,
                reason=command.reason,
            ),
        )
        body = RefundOut(
            refund_id=event.payload.refund_id,
            payment_id=payment_id,
            amount=command.amount,
            currency=state.currency,
            refunded_amount=refunded_total,
            status="refunded" if refunded_total == state.captured_amount else "partially_refunded",
            reason=command.reason,
            version=event.version,
            created_at=now,
        ).model_dump(mode="json")
        return 201, body, [event]

    return WriteCommand(policy, request, _canonical(request), payment_id, decide)


def refund_payment(
    *, engine: Engine, policy: WritePolicy, payment_id: uuid.UUID, command: CreateRefund
) -> Outcome:
    """Refund part of a payment (``refund_command``) in a transaction of its own.

    Reads the payment's events by primary key and folds them; the insert of version n+1
    collides with any concurrent refund that took n+1 first, and the attempt is run again.
    """
    return run_alone(
        engine=engine,
        command=refund_command(policy=policy, payment_id=payment_id, command=command),
    )
