"""What a batch of consumed records does to the read model, computed without I/O.

A record is an event of a stream: a payment's (keyed by its ``payment_id``) or a wallet's (keyed
by ``wallet_stream_id(user_id)``, a UUIDv5, never a payment's id). Both follow the same rules,
by stream id and version; so does a campaign's (keyed by ``campaign_stream_id``, a UUIDv8:
``projector.campaign_rows``, whose grants, wallet events, add to its figures). A registration
(``UserRegistered``, keyed by
``registration_stream_id(user_id)``, a UUIDv3) is known and skipped: the read side shows nothing
of it yet, so it writes no row, is never parked nor dead-lettered, and only moves the offset
(a valid one supersedes an open dead letter of its stream, like any valid event).

Given the current read-side state of the streams a batch touches (their rows, parked events and
open dead letters), ``apply_batch`` decides for each record, in offset order:

- version at or below the stored one: a duplicate, nothing changes;
- exactly the next version: applied through the ledger fold (``kessai.ledger.apply``; for a
  wallet ``kessai.wallets.apply_movement``, ``projector.wallet_rows``), then any parked
  successors are applied in turn;
- more than one ahead: parked as a ``gap`` until its predecessor arrives (exact, no timeout);
- a stream with an open dead letter at version d: versions after d are parked as
  ``blocked``; a valid event for version d itself supersedes the dead letter;
- undecodable, unknown type, newer schema, or breaking a ledger invariant: a dead letter.

Decoding (``decode_batch``) needs no state, so the batch loop does it for the next batch while
the current one is in the database. The result is a ``Changes`` value the repository writes in
one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from zoneinfo import ZoneInfo

import orjson
from pydantic import ValidationError

from kessai.campaigns import AnyCampaignEvent
from kessai.events import (
    SCHEMA_VERSION,
    AnyWalletEvent,
    PaymentCaptured,
    PaymentRefunded,
    RewardGranted,
    RewardTakenBack,
    UserRegistered,
)
from kessai.ledger import InvariantViolation, PaymentState, apply
from projector.campaign_rows import (
    CampaignRow,
    GrantDelta,
    StreamEvent,
    apply_campaign,
    count_grant,
    parse_stream_event,
    stream_id_of,
)
from projector.wallet_rows import MovementRow, WalletRow, apply_wallet_event

PaymentEvent = PaymentCaptured | PaymentRefunded
WalletEvent = AnyWalletEvent
Event = StreamEvent


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, as the projector sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class PaymentRow:
    """A payment as the read model stores it: the fold's state plus descriptive fields."""

    state: PaymentState
    store_id: str | None
    order_ref: str | None
    metadata: str


@dataclass(frozen=True, slots=True)
class Parked:
    payment_id: uuid.UUID
    """The stream's id: the payment's, the wallet's or the campaign's (``stream_id_of``)."""
    version: int
    reason: str
    body: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    payment_id: uuid.UUID | None
    version: int | None
    topic: str
    partition: int
    offset: int
    raw_key: bytes | None
    raw_value: bytes | None
    headers: str
    reason: str
    # "open" blocks the payment's later versions; "resolved" when retried or superseded.
    status: str = "open"


@dataclass(frozen=True, slots=True)
class RefundRow:
    payment_id: uuid.UUID
    version: int
    refund_id: uuid.UUID
    merchant_id: str
    amount: int
    currency: str
    reason: str | None
    created_at: datetime


@dataclass(slots=True)
class TotalsDelta:
    payments_count: int = 0
    payments_amount: int = 0
    refunds_count: int = 0
    refunds_amount: int = 0


@dataclass(slots=True)
class Snapshot:
    """Read-side state of the streams a batch touches, loaded inside the batch transaction."""

    payments: dict[uuid.UUID, PaymentRow] = field(default_factory=dict)
    # By stream id (``wallet_stream_id(user_id)``).
    wallets: dict[uuid.UUID, WalletRow] = field(default_factory=dict)
    campaigns: dict[uuid.UUID, CampaignRow] = field(default_factory=dict)
    parked: dict[tuple[uuid.UUID, int], Parked] = field(default_factory=dict)
    # stream id -> versions of its open dead letters.
    dead_lettered: dict[uuid.UUID, set[int]] = field(default_factory=dict)


@dataclass(slots=True)
class Changes:
    payments: dict[uuid.UUID, PaymentRow] = field(default_factory=dict)
    refunds: list[RefundRow] = field(default_factory=list)
    daily: dict[tuple[str, date, str], TotalsDelta] = field(default_factory=dict)
    hourly: dict[tuple[str, datetime, str], TotalsDelta] = field(default_factory=dict)
    # By stream id; and the statement lines the batch adds.
    wallets: dict[uuid.UUID, WalletRow] = field(default_factory=dict)
    movements: list[MovementRow] = field(default_factory=list)
    # By stream id; and what the batch's grants add to their campaigns' figures.
    campaigns: dict[uuid.UUID, CampaignRow] = field(default_factory=dict)
    campaign_totals: dict[str, GrantDelta] = field(default_factory=dict)
    campaign_minutes: dict[tuple[str, datetime], GrantDelta] = field(default_factory=dict)
    parked: dict[tuple[uuid.UUID, int], Parked] = field(default_factory=dict)
    unparked: set[tuple[uuid.UUID, int]] = field(default_factory=set)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Dead letters superseded by a valid event of the same version: (stream id, version).
    resolved: set[tuple[uuid.UUID, int]] = field(default_factory=set)
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    """Events known and skipped: registrations (nothing on the read side shows them yet)."""
    last_event_at: dict[int, datetime] = field(default_factory=dict)


def decode_payment_id(key: bytes | None) -> uuid.UUID | None:
    if key is None:
        return None
    try:
        return uuid.UUID(key.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def _raw_version(value: bytes | None) -> int | None:
    try:
        version = orjson.loads(value or b"").get("version")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return version if isinstance(version, int) and version >= 1 else None


def decode(record: Record, key_id: uuid.UUID | None = None) -> Event | DeadLetter:
    """The record's event, or the dead letter saying why it cannot be one. ``key_id``: the
    record key's stream id, when the caller decoded it already."""
    if key_id is None:
        key_id = decode_payment_id(record.key)
    headers = dict(record.headers)
    declared = headers.get("schema_version")
    reason: str | None = None
    if declared is not None and declared.isdigit() and int(declared) > SCHEMA_VERSION:
        reason = f"schema_version {int(declared)} is newer than {SCHEMA_VERSION}, the newest known"
    else:
        try:
            event = parse_stream_event(record.value or b"")
        except ValidationError as exc:
            errors = exc.errors()
            if errors:
                where = ".".join(str(p) for p in errors[0]["loc"])
                reason = f"undecodable event: {where}: {errors[0]['msg']}"[:1000]
            else:
                reason = f"undecodable event: {exc}"[:1000]
        else:
            if key_id is not None and key_id != stream_id_of(event):
                reason = _key_mismatch(event)
            elif event.schema_version > SCHEMA_VERSION:
                reason = f"schema_version {event.schema_version} is newer than {SCHEMA_VERSION}"
            else:
                return event
    return DeadLetter(
        payment_id=key_id,
        version=_raw_version(record.value),
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        raw_key=record.key,
        raw_value=record.value,
        headers=orjson.dumps({k: v.decode("latin-1") for k, v in record.headers}).decode(),
        reason=reason,
    )


def _key_mismatch(event: Event) -> str:
    if isinstance(event, PaymentCaptured | PaymentRefunded):
        return "record key does not match the event's payment_id"
    if isinstance(event, UserRegistered):
        return "record key is not the registration stream of the event's user_id"
    if isinstance(event, AnyCampaignEvent):
        return "record key is not the campaign stream of the event's campaign_id"
    return "record key is not the wallet stream of the event's user_id"


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """Consumed records in offset order per partition, each with its decoding."""

    records: list[Record]
    decoded: list[Event | DeadLetter]
    stream_ids: set[uuid.UUID]
    """The payments and wallets the batch may touch (by record key, else by event): the
    snapshot to load."""


def decode_batch(records: Iterable[Record]) -> DecodedBatch:
    listed = list(records)
    keys = [decode_payment_id(r.key) for r in listed]
    decoded = [decode(r, key) for r, key in zip(listed, keys, strict=True)]
    stream_ids = {key for key in keys if key is not None}
    stream_ids.update(
        stream_id_of(event)
        for key, event in zip(keys, decoded, strict=True)
        if key is None and not isinstance(event, DeadLetter)
    )
    return DecodedBatch(records=listed, decoded=decoded, stream_ids=stream_ids)


ZoneLookup = Callable[[str], ZoneInfo]


class _Batch:
    def __init__(self, snapshot: Snapshot, zone_of: ZoneLookup) -> None:
        self.snapshot = snapshot
        self.zone_of = zone_of
        self.changes = Changes()
        self.rows = dict(snapshot.payments)
        self.wallets = dict(snapshot.wallets)
        self.campaigns = dict(snapshot.campaigns)
        self.parked = dict(snapshot.parked)
        self.dead_lettered = {pid: set(vs) for pid, vs in snapshot.dead_lettered.items()}

    def blocked_at(self, payment_id: uuid.UUID) -> int | None:
        versions = self.dead_lettered.get(payment_id)
        return min(versions) if versions else None

    def version_of(self, stream_id: uuid.UUID) -> int:
        row = self.rows.get(stream_id)
        if row is not None:
            return row.state.version
        wallet = self.wallets.get(stream_id)
        if wallet is not None:
            return wallet.wallet.version
        campaign = self.campaigns.get(stream_id)
        return campaign.state.version if campaign is not None else 0

    def handle(self, record: Record, decoded: Event | DeadLetter) -> None:
        if isinstance(decoded, DeadLetter):
            self.dead_letter(decoded)
            return
        event = decoded
        self.changes.last_event_at[record.partition] = max(
            event.recorded_at,
            self.changes.last_event_at.get(record.partition, event.recorded_at),
        )
        pid = stream_id_of(event)
        if isinstance(event, UserRegistered):
            self.skip(pid)
            return
        current = self.version_of(pid)
        if event.version <= current:
            self.changes.duplicates += 1
            return
        blocked_at = self.blocked_at(pid)
        if blocked_at is not None and event.version > blocked_at:
            self.park(event, record, "blocked")
            return
        if event.version > current + 1:
            self.park(event, record, "gap")
            return
        if not self.apply(event, record):
            return
        if blocked_at is not None and event.version == blocked_at:
            self.dead_lettered[pid].discard(blocked_at)
            self.changes.resolved.add((pid, blocked_at))
        self.drain(pid)

    def skip(self, stream_id: uuid.UUID) -> None:
        """A registration: nothing to write but its offset. Being valid, it supersedes an open
        dead letter of its stream (at its version, 1), which blocked nothing else."""
        self.changes.skipped += 1
        if 1 in self.dead_lettered.get(stream_id, ()):
            self.dead_lettered[stream_id].discard(1)
            self.changes.resolved.add((stream_id, 1))

    def apply(self, event: Event, record: Record | Parked) -> bool:
        if isinstance(event, UserRegistered):
            return False  # never parked, so never drained here: ``handle`` skips it first
        if isinstance(event, AnyCampaignEvent):
            return self.apply_campaign(event, record)
        if not isinstance(event, PaymentCaptured | PaymentRefunded):
            return self.apply_wallet(event, record)
        pid = event.payment_id
        row = self.rows.get(pid)
        try:
            state = apply(row.state if row is not None else None, event)
        except InvariantViolation as exc:
            self.invariant_broken(event, record, exc)
            return False
        zone = self.zone_of(event.merchant_id)
        local = event.occurred_at.astimezone(zone)
        day = local.date()
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        keys_daily = (event.merchant_id, day, event.payload.currency)
        keys_hourly = (event.merchant_id, hour, event.payload.currency)
        daily = self.changes.daily.setdefault(keys_daily, TotalsDelta())
        hourly = self.changes.hourly.setdefault(keys_hourly, TotalsDelta())
        if isinstance(event, PaymentCaptured):
            p = event.payload
            new_row = PaymentRow(
                state=state,
                store_id=p.store_id,
                order_ref=p.order_ref,
                metadata=orjson.dumps(p.metadata, option=orjson.OPT_SORT_KEYS).decode(),
            )
            for delta in (daily, hourly):
                delta.payments_count += 1
                delta.payments_amount += p.amount
        else:
            assert row is not None  # apply() refuses a refund of an unknown payment
            new_row = replace(row, state=state)
            r = event.payload
            self.changes.refunds.append(
                RefundRow(
                    payment_id=pid,
                    version=event.version,
                    refund_id=r.refund_id,
                    merchant_id=event.merchant_id,
                    amount=r.amount,
                    currency=r.currency,
                    reason=r.reason,
                    created_at=event.occurred_at,
                )
            )
            for delta in (daily, hourly):
                delta.refunds_count += 1
                delta.refunds_amount += r.amount
        self.rows[pid] = new_row
        self.changes.payments[pid] = new_row
        self.changes.applied += 1
        return True

    def apply_wallet(self, event: WalletEvent, record: Record | Parked) -> bool:
        """A wallet's movement: its balance and its statement line. Merchant totals are not
        touched: the payment's (or refund's) own event counts there."""
        sid = stream_id_of(event)
        try:
            wallet, movement = apply_wallet_event(self.wallets.get(sid), event)
        except InvariantViolation as exc:
            self.invariant_broken(event, record, exc)
            return False
        self.wallets[sid] = wallet
        self.changes.wallets[sid] = wallet
        self.changes.movements.append(movement)
        self.changes.applied += 1
        if isinstance(event, RewardGranted | RewardTakenBack):  # where it is applied: once
            count_grant(self.changes.campaign_totals, self.changes.campaign_minutes, event)
        return True

    def apply_campaign(self, event: AnyCampaignEvent, record: Record | Parked) -> bool:
        """A campaign's event: its row as the fold leaves it."""
        sid = stream_id_of(event)
        try:
            row = apply_campaign(self.campaigns.get(sid), event)
        except InvariantViolation as exc:
            self.invariant_broken(event, record, exc)
            return False
        self.campaigns[sid] = row
        self.changes.campaigns[sid] = row
        self.changes.applied += 1
        return True

    def invariant_broken(self, event: Event, record: Record | Parked, exc: Exception) -> None:
        sid = stream_id_of(event)
        self.dead_letter(
            DeadLetter(
                payment_id=sid,
                version=event.version,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                raw_key=str(sid).encode(),
                raw_value=event.model_dump_json().encode(),
                headers="{}",
                reason=f"ledger invariant broken: {exc}"[:1000],
            )
        )

    def drain(self, pid: uuid.UUID) -> None:
        """Apply parked successors of ``pid`` for as long as the next version is there."""
        while True:
            next_key = (pid, self.version_of(pid) + 1)
            parked = self.parked.get(next_key)
            if parked is None:
                return
            blocked_at = self.blocked_at(pid)
            if blocked_at is not None and next_key[1] > blocked_at:
                return
            del self.parked[next_key]
            self.changes.parked.pop(next_key, None)
            if next_key in self.snapshot.parked:
                self.changes.unparked.add(next_key)
            event = parse_stream_event(parked.body)
            if not self.apply(event, parked):
                return

    def park(self, event: Event, record: Record, reason: str) -> None:
        key = (stream_id_of(event), event.version)
        if key in self.parked:
            return  # the same version parked twice: a duplicate delivery
        parked = Parked(
            payment_id=key[0],
            version=event.version,
            reason=reason,
            body=event.model_dump_json(),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        self.parked[key] = parked
        self.changes.parked[key] = parked

    def dead_letter(self, letter: DeadLetter) -> None:
        pid = letter.payment_id
        if pid is not None:
            version = letter.version or self.version_of(pid) + 1
            if version <= self.version_of(pid):
                # A broken copy of a version already applied: recorded, blocks nothing.
                self.changes.dead_letters.append(
                    replace(letter, version=version, status="resolved")
                )
                return
            letter = replace(letter, version=version)
            self.dead_lettered.setdefault(pid, set()).add(version)
        self.changes.dead_letters.append(letter)


def apply_batch(
    records: Iterable[Record] | DecodedBatch, snapshot: Snapshot, zone_of: ZoneLookup
) -> Changes:
    """Everything a batch does to the read model; ``records`` in offset order per partition,
    decoded already or not."""
    decoded = records if isinstance(records, DecodedBatch) else decode_batch(records)
    batch = _Batch(snapshot, zone_of)
    for record, event in zip(decoded.records, decoded.decoded, strict=True):
        batch.handle(record, event)
    return batch.changes
