"""Device-group admission control: under a surge, serve a rotating share of devices whole.

Cutting random requests breaks payment flows halfway (the user who got through step one fails
step two). Instead, time is cut into windows of ``window_seconds``, and a device is admitted
for a whole window when a stable hash of (device id, window number) falls in the admitted
``percent``: every request of an admitted device in that window passes, every request of the
others gets ``503 temporarily_restricted`` with ``Retry-After`` at the window's end, and the next
window admits a different group, so nobody is shut out for long.

The hash is BLAKE2b (stable across processes and restarts, unlike Python's salted ``hash()``),
so every replica makes the same decision for the same device without sharing state.

Settings come from ``KESSAI_ADMISSION_*`` and can be changed live with
``PUT /v1/admin/admission``: the live values are one row of the write store, which each
process re-reads in the background every ``RELOAD_SECONDS`` (never on the request path).

Adaptive (``KESSAI_ADMISSION_ADAPTIVE``, on by default, acting only while admission control is
enabled): the share in force follows the process's own load. ``AdaptiveShare`` watches the
queue delay of the load shedder (``kessai/overload.py``) and lowers the share
multiplicatively for every second the delay stays above ``KESSAI_ADMISSION_TARGET_DELAY_MS``,
raises it additively once it clears, never below ``KESSAI_ADMISSION_FLOOR_PERCENT`` nor above
the configured percent. Lowering the threshold alone would evict devices mid-window (a device
whose hash lies between the new share and the old one was admitted a moment ago and would now
be refused, halfway through paying); ``AdmittedDevices`` remembers who was admitted in the
current window and keeps them admitted until it ends.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from kessai.auth import principal_of
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.schema.write import admission_settings
from kessai.settings import Settings

log = logging.getLogger(__name__)

RELOAD_SECONDS = 1.0
"""How stale a process's view of the live settings may be."""
_SCALE = 1 << 64

MESSAGE_JA = "ただいま大変混み合っています。しばらくしてから、もう一度お試しください。"
MESSAGE_EN = "We are very busy right now. Please try again in a little while."

WithoutDevice = Literal["admit", "refuse"]


class AdmissionPolicy(BaseModel):
    """What admission control does; the body of ``PUT /v1/admin/admission``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict: `false` is not a percentage, nor `"60"` (or `60.0`) a number of seconds.
    enabled: bool = Field(strict=True, description="Off: every request passes.")
    percent: float = Field(
        strict=True, ge=0, le=100, description="Share of devices admitted per window."
    )
    window_seconds: int = Field(
        strict=True, ge=10, le=86_400, description="How long a device stays admitted (or not)."
    )
    without_device: WithoutDevice = Field(
        description="Requests without X-Device-Id: `admit` them, or `refuse` them while "
        "admission control is on."
    )


def admitted(device_id: str, percent: float, window_seconds: int, now: float) -> bool:
    """Is ``device_id`` in the admitted group of the window holding ``now``?"""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    window = int(now // window_seconds)
    digest = hashlib.blake2b(f"{window}:{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < percent / 100 * _SCALE


def window_end(window_seconds: int, now: float) -> float:
    return (int(now // window_seconds) + 1) * window_seconds


class AdaptiveShare:
    """AIMD on the admitted share, from the queue delay of the load shedder.

    Time is cut into intervals of ``interval`` seconds. An interval in which most requests
    (the median) waited longer than ``target_delay`` had a standing queue: the share is
    multiplied by ``decrease``, down to ``floor``. Any other interval, including one with no
    traffic at all, adds ``increase`` percentage points: a burst that drains is a good queue.
    The share read is always clamped to the configured percent (the ``ceiling``), which an
    operator may change at any time.

    The median rather than CoDel's minimum: the shedder's queue is short (a few dozen), and
    under a flood it empties for an instant now and then, so some request always finds a free
    slot; the minimum stayed at microseconds while most requests were being refused
    (``tests/integration/test_overload.py``).
    """

    def __init__(
        self,
        *,
        target_delay: float,
        floor: float,
        interval: float = 1.0,
        decrease: float = 0.7,
        increase: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_delay = target_delay
        self.floor = floor
        self.interval = interval
        self.decrease = decrease
        self.increase = increase
        self.clock = clock
        self._share = 100.0
        self._ceiling = 100.0
        self._since = clock()
        self._above = self._seen = 0

    def _roll(self, ceiling: float) -> None:
        now = self.clock()
        if now - self._since < self.interval:
            return
        if self._above * 2 > self._seen:
            self._share = max(self.floor, min(self._share, ceiling) * self.decrease)
            self._since += self.interval
        elapsed = int((now - self._since) // self.interval)  # clear (or empty) intervals
        self._share = min(100.0, self._share + self.increase * elapsed)
        self._since += self.interval * elapsed
        self._above = self._seen = 0

    def observe(self, delay: float) -> None:
        """The queue delay (seconds) of one request that asked the load shedder for a slot."""
        self._roll(self._ceiling)
        self._seen += 1
        if delay > self.target_delay:
            self._above += 1

    def percent(self, ceiling: float) -> float:
        """The share in force now, given the configured percent."""
        self._ceiling = ceiling
        self._roll(ceiling)
        return min(ceiling, max(self._share, min(self.floor, ceiling)))


ADMITTED_DEVICES_MAX = 200_000
"""Most devices remembered as admitted in the current window, per process; beyond it the hash
alone decides (a lowered share may then refuse a device admitted earlier in the window)."""


@dataclass(slots=True)
class AdmittedDevices:
    """The devices admitted in the current window, so a share lowered mid-window refuses
    only devices that had not started."""

    size: int = ADMITTED_DEVICES_MAX
    _window: int = -1
    _devices: set[str] = field(default_factory=set)

    def decide(
        self, device_id: str, percent: float, ceiling: float, window_seconds: int, now: float
    ) -> bool:
        """Admit ``device_id`` under the share ``percent``, or because it was admitted earlier
        in this window under a share the operator's ``ceiling`` still allows."""
        window = int(now // window_seconds)
        if window != self._window:
            self._window = window
            self._devices.clear()
        if admitted(device_id, percent, window_seconds, now):
            if len(self._devices) < self.size:
                self._devices.add(device_id)
            return True
        return device_id in self._devices and admitted(device_id, ceiling, window_seconds, now)


@dataclass(slots=True)
class Admission:
    """One process's admission control: the policy (reloaded from the write store) and the
    allowlists (from settings)."""

    engine: Engine
    defaults: AdmissionPolicy
    allow_keys: frozenset[str]
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    adaptive: AdaptiveShare | None = None
    admitted_devices: AdmittedDevices = field(default_factory=AdmittedDevices)
    _policy: AdmissionPolicy | None = None

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> Admission:
        return cls(
            engine=engine,
            defaults=AdmissionPolicy(
                enabled=settings.admission_enabled,
                percent=settings.admission_percent,
                window_seconds=settings.admission_window_seconds,
                without_device=settings.admission_without_device,
            ),
            allow_keys=frozenset(settings.admission_allow_keys),
            allow_networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.admission_allow_ips
            ),
            adaptive=AdaptiveShare(
                target_delay=settings.admission_target_delay_ms / 1000,
                floor=settings.admission_floor_percent,
            )
            if settings.admission_adaptive
            else None,
        )

    async def policy(self) -> AdmissionPolicy:
        """The policy in force: never a query on the request path (``refresh_forever`` keeps
        it current), so a slow or locked write store does not hold requests here."""
        return self._policy or self.defaults

    async def reload(self) -> None:
        try:
            stored = await anyio.to_thread.run_sync(load_policy, self.engine)
        except sa.exc.SQLAlchemyError:
            log.warning("could not read the admission settings; keeping the last ones")
            return
        self._policy = stored or self.defaults

    async def refresh_forever(self) -> None:
        """Re-read the live policy every ``RELOAD_SECONDS`` (a task of the app's lifespan)."""
        while True:
            await self.reload()
            await anyio.sleep(RELOAD_SECONDS)

    def admitted_percent(self) -> float:
        """The share of devices admitted now: the configured percent, or less while the
        adaptive share is lowered; 100 with admission control off."""
        policy = self._policy or self.defaults
        if not policy.enabled:
            return 100.0
        if self.adaptive is None:
            return policy.percent
        return self.adaptive.percent(policy.percent)

    def applied(self, policy: AdmissionPolicy) -> None:
        """This process changed the policy: apply it here at once."""
        self._policy = policy

    def bypasses(self, key_id: str, client_ip: str | None) -> bool:
        if key_id in self.allow_keys:
            return True
        if client_ip is None or not self.allow_networks:
            return False
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.allow_networks)

    async def check(self, request: Request, device_id: str | None) -> None:
        """Raise ``503 temporarily_restricted`` unless this request is admitted."""
        policy = await self.policy()
        if not policy.enabled:
            return
        client = request.client.host if request.client else None
        if self.bypasses(principal_of(request.state).key_id, client):
            return
        now = time.time()
        if device_id is None:
            if policy.without_device == "admit":
                return
        elif self.adaptive is None:
            if admitted(device_id, policy.percent, policy.window_seconds, now):
                return
        elif self.admitted_devices.decide(
            device_id,
            self.adaptive.percent(policy.percent),
            policy.percent,
            policy.window_seconds,
            now,
        ):
            return
        retry_after = max(1, math.ceil(window_end(policy.window_seconds, now) - now))
        raise ApiError(
            503,
            "temporarily_restricted",
            f"{MESSAGE_JA} / {MESSAGE_EN}",
            {
                "message_ja": MESSAGE_JA,
                "message_en": MESSAGE_EN,
                "retry_after_seconds": retry_after,
                "reason": "device_not_admitted" if device_id else "device_id_missing",
            },
            headers={"Retry-After": str(retry_after)},
        )


def load_policy(engine: Engine) -> AdmissionPolicy | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(admission_settings).where(admission_settings.c.setting_id == 1)
        ).first()
    if row is None:
        return None
    return AdmissionPolicy(
        enabled=bool(row.enabled),
        percent=float(row.percent),
        window_seconds=int(row.window_seconds),
        without_device=row.without_device,
    )


def store_policy(engine: Engine, policy: AdmissionPolicy, updated_by: str) -> None:
    values = {**policy.model_dump(), "updated_at": utcnow(), "updated_by": updated_by}
    table = admission_settings
    for _ in range(2):  # two first writers at once: the loser's insert collides, then updates
        try:
            with engine.begin() as conn:
                updated = conn.execute(
                    table.update().where(table.c.setting_id == 1).values(values)
                ).rowcount
                if not updated:
                    conn.execute(table.insert().values(setting_id=1, **values))
            return
        except sa.exc.IntegrityError:
            continue
    raise RuntimeError("admission settings could not be stored")  # pragma: no cover
