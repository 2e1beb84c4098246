"""The load shedder's gate: a bounded number of holders, a share only preferred requests may
use, short bounded queues, and no slot lost to a waiter that gave up."""

from __future__ import annotations

import asyncio

from kessai.overload import Gate, reserved_slots


async def test_new_requests_leave_the_reserved_share_to_preferred_ones() -> None:
    gate = Gate(limit=4, reserved=1, max_waiting=4)
    assert [await gate.enter(False, 0.01) for _ in range(3)] == [None] * 3
    assert await gate.enter(False, 0.01) == "queue_timeout"  # only 3 slots for new ones
    assert await gate.enter(True, 0.01) is None  # the reserved one
    assert gate.in_flight == 4
    assert await gate.enter(True, 0.01) == "queue_timeout"
    assert (gate.in_flight, gate.waiting) == (4, 0)


async def test_a_freed_slot_goes_to_the_preferred_waiter_first() -> None:
    gate = Gate(limit=2, reserved=0, max_waiting=4)
    assert await gate.enter(False, 1) is None
    assert await gate.enter(False, 1) is None
    order: list[str] = []

    async def wait(name: str, preferred: bool) -> None:
        assert await gate.enter(preferred, 5) is None
        order.append(name)

    new = asyncio.create_task(wait("new", False))
    await asyncio.sleep(0)
    preferred = asyncio.create_task(wait("preferred", True))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    gate.leave()
    await asyncio.sleep(0.01)
    assert order == ["preferred"]
    gate.leave()
    await asyncio.gather(new, preferred)
    assert order == ["preferred", "new"]
    assert gate.in_flight == 2


async def test_the_queues_are_bounded_each_on_its_own() -> None:
    gate = Gate(limit=1, reserved=0, max_waiting=1)
    assert await gate.enter(False, 1) is None
    waiter = asyncio.create_task(gate.enter(False, 5))
    await asyncio.sleep(0)
    assert await gate.enter(False, 5) == "queue_full"  # refused at once, no wait
    # A flood of new requests does not fill the preferred requests' queue.
    preferred = asyncio.create_task(gate.enter(True, 5))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    gate.leave()
    assert await preferred is None
    gate.leave()
    assert await waiter is None
    assert gate.in_flight == 1


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    gate = Gate(limit=1, reserved=0, max_waiting=4)
    assert await gate.enter(False, 1) is None
    waiter = asyncio.create_task(gate.enter(False, 5))
    await asyncio.sleep(0)
    gate.leave()  # the slot is handed to the waiter...
    waiter.cancel()  # ... which is cancelled before it runs: the slot comes back
    await asyncio.gather(waiter, return_exceptions=True)
    assert (gate.in_flight, gate.waiting) == (0, 0)
    assert await gate.enter(False, 0.01) is None


def test_some_slots_are_always_left_for_new_requests() -> None:
    assert reserved_slots(64, 25) == 16
    assert reserved_slots(4, 99) == 3
    assert reserved_slots(1, 50) == 0
