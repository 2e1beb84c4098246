"""What ``bench.overload`` prints and the ratios it reports: each server's open loop, and the
targets against the baseline measured in the same run."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from bench.reconciler import machine_table
from bench.writes import console

TARGETS = {"admitted_p99_ms": 100.0, "client_timeouts": 0, "refusals_with_retry_after": 1.0}
LABELS = ("proxied", "shedding", "baseline")
"""The servers of a run, in the order they are shown (``proxied`` only with ``--proxy``)."""


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _p99(figures: dict[str, Any]) -> float | None:
    value: float | None = figures["admitted_latency_ms"]["p99"]
    return value


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Shedding (and the proxy) against the baseline of the same run."""
    s, b = report["shedding"], report["baseline"]
    capacity = report["capacity"]["ok_per_second"]
    found: dict[str, Any] = {
        "admitted_p99": _ratio(_p99(s), _p99(b)),
        "refused_p50_vs_admitted_p99": _ratio(s["refused_latency_ms"]["p50"], _p99(s)),
        "admitted_per_second": _ratio(s["admitted_per_second"], b["admitted_per_second"]),
        "admitted_per_second_vs_capacity": _ratio(s["admitted_per_second"], capacity),
    }
    if "proxied" in report:
        p = report["proxied"]
        found["proxied_admitted_p99"] = _ratio(_p99(p), _p99(b))
        found["proxied_admitted_per_second_vs_capacity"] = _ratio(
            p["admitted_per_second"], capacity
        )
        direct = (capacity + report["capacity_again"]["ok_per_second"]) / 2
        found["capacity_through_proxy"] = _ratio(
            report["capacity_through_proxy"]["ok_per_second"], direct
        )
    return found


def show(report: dict[str, Any]) -> None:
    show_run(report)
    show_open_loops(report)
    show_targets(report)


def show_run(report: dict[str, Any]) -> None:
    st = report["settings"]
    about = machine_table(report["machine"])
    about.add_row(
        "run",
        f"capacity: {st['capacity_connections']} connections closed loop, "
        f"{st['capacity_seconds']:g} s; then {st['factor']:g}x that open loop over "
        f"{st['connections']} connections for {st['seconds']:g} s; client time-out "
        f"{st['timeout_seconds']:g} s; {st['workers']} uvicorn workers"
        + (
            f"; server pinned to CPU {st['pin'].partition(':')[0]}, "
            f"client to CPU {st['pin'].partition(':')[2]}"
            if st.get("pin")
            else "; client and server unpinned (they share the cores)"
        ),
    )
    if st.get("proxy"):
        about.add_row(
            "proxy",
            f"nginx in front (on the server's CPUs): {st['proxy_max_in_flight']} requests in "
            f"flight, {st['proxy_refund_in_flight']} more for refunds",
        )
    console.print(about)
    cap = report["capacity"]
    console.print(
        f"capacity (closed loop): {cap['ok_per_second']:,.0f} ok/s, "
        f"p99 {cap['latency_ms']['p99']} ms"
    )
    through = report.get("capacity_through_proxy")
    if through is not None:
        console.print(
            f"capacity through nginx, its bounds out of the way: {through['ok_per_second']:,.0f}"
            f" ok/s, p99 {through['latency_ms']['p99']} ms; direct again "
            f"{report['capacity_again']['ok_per_second']:,.0f} ok/s; through nginx / direct "
            f"(the mean of both): {report['ratios']['capacity_through_proxy']}"
        )


def show_open_loops(report: dict[str, Any]) -> None:
    table = Table(title="open loop past capacity (latencies in ms, from when a request was due)")
    for column in (
        "server", "offered/s", "sent/s", "admitted/s", "admitted p50", "admitted p99",
        "refused", "refused p50", "refused p99", "with Retry-After", "time-outs",
        "unseen commits", "client CPU s",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "server" else "right")
    for label in LABELS:
        if label not in report:
            continue
        f = report[label]
        share = f["refusals_with_retry_after"]
        table.add_row(
            label,
            f"{f['offered_per_second']:,.0f}",
            f"{f['sent_per_second']:,.0f}",
            f"{f['admitted_per_second']:,.0f}",
            _ms(f["admitted_latency_ms"]["p50"]),
            _ms(f["admitted_latency_ms"]["p99"]),
            f"{f['refused']:,}",
            _ms(f["refused_latency_ms"]["p50"]),
            _ms(f["refused_latency_ms"]["p99"]),
            "-" if share is None else f"{share:.1%}",
            f"{f['client_timeouts']:,}",
            f"{f['payments_committed_unseen']:,}",
            f"{f['client_cpu_seconds']:.1f}",
        )
    console.print(table)


def _met(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def _share(f: dict[str, Any]) -> str:
    share = f["refusals_with_retry_after"]
    return "-" if share is None else f"{share:.1%} of {f['refused']:,}"


def show_targets(report: dict[str, Any]) -> None:
    """Each server with a bound (shedding, and proxied) against the targets."""
    b, r = report["baseline"], report["ratios"]
    for label in ("shedding", "proxied"):
        if label not in report:
            continue
        f = report[label]
        title = "with shedding" if label == "shedding" else "behind nginx, with shedding"
        targets = Table(title=f"{title}, against the targets (baseline: without, same run)")
        for column in ("figure", "measured", "baseline", "target", "met"):
            targets.add_column(column)
        p99 = _p99(f)
        ratio = r["admitted_p99"] if label == "shedding" else r["proxied_admitted_p99"]
        targets.add_row(
            "admitted p99",
            f"{_ms(p99)} ms ({ratio} x baseline)",
            f"{_ms(_p99(b))} ms",
            f"< {TARGETS['admitted_p99_ms']:g} ms",
            _met(p99 is not None and p99 < TARGETS["admitted_p99_ms"]),
        )
        targets.add_row(
            "client time-outs",
            f"{f['client_timeouts']:,}",
            f"{b['client_timeouts']:,}",
            "0",
            _met(f["client_timeouts"] == 0),
        )
        share = f["refusals_with_retry_after"]
        targets.add_row(
            "refusals that are 503/429 with Retry-After",
            _share(f),
            _share(b),
            "all",
            _met(share is None or share == 1.0),
        )
        targets.add_row(
            "payments committed whose 201 the client never saw",
            f"{f['payments_committed_unseen']:,}",
            f"{b['payments_committed_unseen']:,}",
            "",
            "",
        )
        targets.add_row(
            f"admitted/s, {label} / baseline",
            str(_ratio(f["admitted_per_second"], b["admitted_per_second"])),
            "",
            "",
            "",
        )
        console.print(targets)
