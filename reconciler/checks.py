"""How far each check of the reconciler is verified: "verified up to", per check.

A run is several checks (``RECONCILER_CHECKS``), each owning some kinds of finding:

- ``payments``: the payments' read rows, parked events and dead letters (of payments and of
  the other streams of the payments' topic but wallets'), orphan read rows, the outbox
  (``missing``, ``mismatch``, ``invalid_write_history``, ``parked``, ``dead_letter``,
  ``orphan``, ``outbox_stuck``), and the campaigns' read rows and figures (``campaign``,
  ``campaign_totals``);
- ``totals``: the merchant buckets (``daily_totals``, ``hourly_totals``, ``totals_unverified``);
- ``trial_balance``, ``wallet_chain``, ``wallet_movement``: the ledger in the write store;
- ``wallet_balance``: the wallets on the read side, with the parked events and dead letters of
  wallet streams (repaired with their wallets);
- ``grants``: each campaign's budget against its grants in the write store
  (``campaign_budget``) and the eligible payments and registrations without their grant
  (``grant_missing``: unrepaired until the rewards service grants it, so the check stays
  where it was and the next run looks again).

Each check is verified up to an instant: everything it covers, from the beginning of the
ledger up to then, is known consistent. A completed, non-dry run moves a check's instant to the
run's upper bound (its look-around: ``RunResult.watermark_to``, never past an event still in the
outbox) when the check has no unrepaired finding in the run and the run continues what the
check verified before: a full audit (or a first run: everything) always does; an incremental
run does when its scope starts at or before the check's instant, so nothing between is left
unchecked. A check with an unrepaired finding keeps its instant, whatever the others do: drift
in one check neither hides that the others are verified nor advances itself. A dry run, a
failed or a stopped one advances nothing.

The totals are the exception: an incremental run checks only the buckets that began after its
scope's start (``reconciler.totals``), so the events after that start that fall in an earlier
bucket (the day under way) are not checked by it. Only a full audit advances ``totals``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kessai.schema.read import RECONCILER_CHECKS
from reconciler.records import CheckResult, Finding, Scope, Verified
from reconciler.wallets import is_wallet_stream

CHECK_OF_KIND = {
    "missing": "payments",
    "mismatch": "payments",
    "invalid_write_history": "payments",
    "parked": "payments",
    "dead_letter": "payments",
    "orphan": "payments",
    "outbox_stuck": "payments",
    "campaign": "payments",
    "campaign_totals": "payments",
    "campaign_budget": "grants",
    "grant_missing": "grants",
    "daily_totals": "totals",
    "hourly_totals": "totals",
    "totals_unverified": "totals",
    "trial_balance": "trial_balance",
    "wallet_chain": "wallet_chain",
    "wallet_movement": "wallet_movement",
    "wallet_balance": "wallet_balance",
}
ONLY_IN_FULL = {"totals"}
"""Checks an incremental run never advances (see the module's docstring)."""


def belongs_to(finding: Finding) -> tuple[str, ...]:
    """The check a finding belongs to (every check, for a kind none owns: nothing is vouched
    for past what is not understood)."""
    if finding.kind in ("parked", "dead_letter") and is_wallet_stream(finding.payment_id):
        return ("wallet_balance",)
    check = CHECK_OF_KIND.get(finding.kind)
    return RECONCILER_CHECKS if check is None else (check,)


def continues(check: str, scope: Scope, verified: datetime | None) -> bool:
    """Whether a run of ``scope`` leaves nothing unchecked between what ``check`` verified
    before (up to ``verified``) and the run's own span."""
    if scope.after is None:
        return True
    if check in ONLY_IN_FULL:
        return False
    return verified is not None and scope.after <= verified


def conclude(
    findings: Sequence[Finding],
    *,
    before: Verified,
    scope: Scope,
    upper: datetime,
    advance: bool,
) -> dict[str, CheckResult]:
    """Each check's findings, those unrepaired, and how far it is verified after the run:
    ``upper`` where the run verified it (only if ``advance``: a completed, non-dry run),
    else what it was ``before``."""
    found = dict.fromkeys(RECONCILER_CHECKS, 0)
    unrepaired = dict.fromkeys(RECONCILER_CHECKS, 0)
    for f in findings:
        for check in belongs_to(f):
            found[check] += 1
            unrepaired[check] += not f.repaired
    concluded = {}
    for check in RECONCILER_CHECKS:
        previous = before.get(check)
        verified = previous
        if advance and unrepaired[check] == 0 and continues(check, scope, previous):
            verified = upper if previous is None else max(previous, upper)
        concluded[check] = CheckResult(found[check], unrepaired[check], verified)
    return concluded
