"""What the queries bench prints: ratios to the bare baseline, and the tables."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.reconciler import (
    machine_table,
)

TARGETS = {"summary_p99_ms": 20.0, "list_p99_ms": 30.0, "at_payments": 10_000_000}
"""At 10,000,000 payments: summary p99 < 20 ms, list page p99 < 30 ms."""


console = Console(width=None if sys.stdout.isatty() else 120)


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run with its rate and p99 against the mean of its baseline's runs."""
    base: dict[str, tuple[float, float]] = {}
    for key in {r["baseline"] for r in runs}:
        mine = [r for r in runs if r["key"] == key]
        if mine:
            base[key] = (
                sum(r["per_second"] for r in mine) / len(mine),
                sum(r["latency_ms"]["p99"] for r in mine) / len(mine),
            )
    for r in runs:
        rate, p99 = base.get(r["baseline"], (0.0, 0.0))
        r["rate_vs_bare"] = round(r["per_second"] / rate, 3) if rate else None
        r["p99_vs_bare"] = round(r["latency_ms"]["p99"] / p99, 2) if p99 else None
    return runs


def show(report: dict[str, Any]) -> None:
    """Print the run: what was measured on what, each kind, memory, plans, targets."""
    console.print(about_table(report))
    console.print(kinds_table(report))
    console.print(memory_table(report))
    console.print(plans_table(report))
    if report["open_loop"]:
        console.print(open_loop_table(report))
    console.print(targets_table(report))


def about_table(report: dict[str, Any]) -> Table:
    s, d = report["settings"], report["data"]
    about = machine_table(report["machine"])
    about.add_row(
        "data",
        f"{d['payments']:,} payments ({d['big_merchant_payments']:,} of m00000), "
        f"{d['refunds']:,} refunds, {d['merchants']:,} merchants, {d['days']} days; totals rows: "
        f"{d['daily_totals_rows']:,} by day, {d['hourly_totals_rows']:,} by hour",
    )
    about.add_row("tables MiB", ", ".join(f"{k} {v:,}" for k, v in sorted(d["table_mib"].items())))
    if "load" in report:
        load = report["load"]
        about.add_row(
            "load time",
            f"{load['seconds']} s: rows {load['rows_seconds']} s, indexes "
            f"{load['indexes_seconds']} s, totals {load['totals_seconds']} s",
        )
    about.add_row(
        "run",
        f"{s['connections']} connections, {s['seconds']:g} s per kind (+{s['warmup_seconds']:g} s "
        f"warm-up), {s['workers']} uvicorn workers, summary cache {s['summary_cache_seconds']:g} s "
        f"({'Redis' if s['redis'] else 'per process'})",
    )
    check = report["check"]
    about.add_row(
        "check",
        f"passed: {len(check['summaries'])} summaries, {check['pages']} pages, "
        f"{check['walked_payments']:,} payments walked",
    )
    return about


def kinds_table(report: dict[str, Any]) -> Table:
    table = Table(
        title="by kind: req/s and latency ms (x bare: rate / bare rate, p99 / bare p99); "
        "CPU s of the API and the DB; DB connections opened"
    )
    for column in (
        "kind", "req/s", "x bare", "p50", "p90", "p99", "x bare", "max", "errors",
        "API", "DB", "conns",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column == "kind" else "right", no_wrap=column == "kind"
        )
    for r in report["runs"]:
        bad = sum(v for k, v in r["by_status"].items() if not 200 <= int(k) < 300)
        rows = [(r["name"], r["latency_ms"])]
        if len(r["latency_ms_by_tag"]) > 1:
            rows += [(f"  {tag}", lat) for tag, lat in r["latency_ms_by_tag"].items()]
        for i, (label, lat) in enumerate(rows):
            first = i == 0

            def only(text: str, first: bool = first) -> str:
                return text if first else ""

            table.add_row(
                label,
                f"{r['per_second']:,.0f}" if first else f"{lat['count']:,}",
                only("-" if r["rate_vs_bare"] is None else f"{r['rate_vs_bare']:.2f}"),
                *(f"{lat[q]:.1f}" for q in ("p50", "p90", "p99")),
                only("-" if r["p99_vs_bare"] is None else f"{r['p99_vs_bare']:.1f}"),
                f"{lat['max']:.0f}",
                only(f"{bad + r['connection_errors']:,}"),
                only(f"{r['api_cpu_seconds']:.1f}"),
                only("-" if r["db_cpu_seconds"] is None else f"{r['db_cpu_seconds']:.1f}"),
                only(
                    "-" if r["db_connections_opened"] is None else str(r["db_connections_opened"])
                ),
            )
    return table


def memory_table(report: dict[str, Any]) -> Table:
    mem = report["memory"]
    memory = Table(title="peak RSS (VmHWM) of the served processes, MiB")
    memory.add_column("server")
    memory.add_column("per process (supervisor, workers)")
    memory.add_column("largest", justify="right")
    for label, key in (("query API", "query_api"), ("bare", "bare")):
        memory.add_row(
            label,
            ", ".join(f"{x:.0f}" for x in mem[key]["peak_rss_mib_per_process"]),
            f"{mem[key]['peak_rss_mib_max']:.0f}",
        )
    return memory


def plans_table(report: dict[str, Any]) -> Table:
    sqlite = str(report["machine"]["database"]).startswith("SQLite")
    plans = Table(
        title=f"{'EXPLAIN QUERY PLAN' if sqlite else 'ANALYZE'} of the statements the API issues"
    )
    for column in ("query", "type", "key", "rows (est.)", "r_rows", "r_filtered", "Extra", "ms"):
        plans.add_column(column)
    for e in report["explain"]:
        for step in e["plan"]:
            plans.add_row(
                e["query"],
                str(step.get("type")),
                str(step.get("key")),
                str(step.get("rows")),
                str(step.get("r_rows")),
                str(step.get("r_filtered")),
                str(step.get("detail" if sqlite else "Extra")),
                f"{e['statement_ms']:.2f}",
            )
    return plans


def targets_table(report: dict[str, Any]) -> Table:
    s, d = report["settings"], report["data"]
    saturated = {r["key"]: r for r in report["runs"]}
    targets = Table(
        title=f"targets (at {TARGETS['at_payments']:,} payments): p99 at the stated rate "
        f"(open loop); p99 at {s['connections']} connections (saturated) for reference"
    )
    for column in ("kind", "rate/s", "p99 ms", "target", "met", "saturated p99 ms"):
        targets.add_column(column, justify="left" if column == "kind" else "right")
    for o in report["open_loop"]:
        limit = target_ms(o["group"])
        p99 = o["api"]["latency_ms"]["p99"]
        ok = p99 < limit and o["sustained"]
        targets.add_row(
            o["name"],
            f"{o['rate']:,.0f}",
            f"{p99:.1f}",
            f"< {limit:g} ms",
            "[green]yes[/green]" if ok else "[red]no[/red]",
            f"{saturated[o['key']]['latency_ms']['p99']:.1f}",
        )
    if d["payments"] != TARGETS["at_payments"]:
        targets.caption = f"measured at {d['payments']:,} payments, not at the target's size"
    return targets


def target_ms(group: str) -> float:
    return TARGETS["summary_p99_ms"] if group == "summary" else TARGETS["list_p99_ms"]


def open_loop_table(report: dict[str, Any]) -> Table:
    s = report["settings"]
    how = (
        f"{s['open_loop_rate']:,.0f} requests/s"
        if s["open_loop_rate"] is not None
        else f"{s['open_loop_rate_share']:.0%} of the kind's closed-loop req/s"
    )
    table = Table(
        title=f"open loop at a stated rate ({how}; latency from when each request was due), "
        "the bare endpoint at the same rate"
    )
    for column in (
        "kind", "rate/s", "ans/s", "p50", "p90", "p99", "max",
        "bare p50", "bare p99", "p99 x bare", "errors",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column == "kind" else "right", no_wrap=column == "kind"
        )
    for o in report["open_loop"]:
        mine, bare = o["api"], o["bare"]
        lat, base = mine["latency_ms"], bare["latency_ms"]
        bad = sum(v for k, v in mine["by_status"].items() if not 200 <= int(k) < 300)
        answered = f"{mine['per_second']:,.0f}"
        table.add_row(
            o["name"],
            f"{o['rate']:,.0f}",
            answered if o["sustained"] else f"[red]{answered}[/red]",
            *(f"{lat[q]:.1f}" for q in ("p50", "p90", "p99")),
            f"{lat['max']:.0f}",
            f"{base['p50']:.1f}",
            f"{base['p99']:.1f}",
            "-" if o["p99_vs_bare"] is None else f"{o['p99_vs_bare']:.1f}",
            f"{bad + mine['connection_errors']:,}",
        )
    table.caption = "ans/s (answered) in red: the server (or the bare one) fell behind the schedule"
    return table
