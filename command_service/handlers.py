"""The command handlers: each runs one write-store transaction that it begins and commits.

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
from datetime import timedelta
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
from kessai.ledger import fold

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


Work = Callable[
    [sa.Connection], tuple[int, dict[str, Any], list[PaymentCaptured | PaymentRefunded]]
]


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


def decline_payment(
    *,
    engine: Engine,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str,
) -> Outcome:
    """Record the acquirer's decline of a card payment as the request's answer: ``402
    card_declined``, replayed for the same key, and no event (nothing was captured)."""
    body = {
        "error": {
            "code": "card_declined",
            "message": "The card issuer declined the payment; nothing was captured.",
            "details": {"authorization_id": authorization_id},
        }
    }

    def work(_conn: sa.Connection) -> tuple[int, dict[str, Any], list[Any]]:
        return 402, body, []

    return _run_idempotent(
        engine=engine, policy=policy, request=_payment_request(command, device_id), work=work
    )


def capture_payment(
    *,
    engine: Engine,
    policy: WritePolicy,
    command: CreatePayment,
    device_id: str | None,
    authorization_id: str | None = None,
) -> Outcome:
    """Record a captured payment: one ``PaymentCaptured`` event, version 1, carrying the
    acquirer's ``authorization_id`` for a card payment that was authorized."""
    request = _payment_request(command, device_id)

    def work(_conn: sa.Connection) -> tuple[int, dict[str, Any], list[Any]]:
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

    return _run_idempotent(engine=engine, policy=policy, request=request, work=work)


def refund_payment(
    *, engine: Engine, policy: WritePolicy, payment_id: uuid.UUID, command: CreateRefund
) -> Outcome:
    """Refund part of a payment: one ``PaymentRefunded`` event at the next version.

    Reads the payment's events by primary key and folds them; the insert of version n+1
    collides with any concurrent refund that took n+1 first, and the attempt is run again.
    """
    request = {
        "operation": "refund_payment",
        "payment_id": str(payment_id),
        **command.model_dump(mode="json"),
    }

    def work(conn: sa.Connection) -> tuple[int, dict[str, Any], list[Any]]:
        state = fold(repository.load_payment_events(conn, payment_id))
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

    return _run_idempotent(engine=engine, policy=policy, request=request, work=work)
